package subnetenv

import (
	"errors"
	"github.com/leased/leased/pkg/ipfam"
	"io/fs"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"
)

var (
	net4 = netip.MustParsePrefix("10.100.0.0/16")
	sub4 = netip.MustParsePrefix("10.100.15.0/24")
	net6 = netip.MustParsePrefix("2001:db8:cd11::/48")
	sub6 = netip.MustParsePrefix("2001:db8:cd11:0:8000::/80")
)

func TestRender(t *testing.T) {
	tests := []struct {
		name string
		env  Env
		want string
	}{
		{
			name: "IPv4 only",
			env:  Env{Network: ipfam.Pair[netip.Prefix]{V4: net4}, Subnet: ipfam.Pair[netip.Prefix]{V4: sub4}, MTU: 1450, IPMasq: true, Backend: "vxlan"},
			want: `# written by leased; do not edit
LEASED_NETWORK=10.100.0.0/16
LEASED_SUBNET=10.100.15.1/24
LEASED_MTU=1450
LEASED_IPMASQ=true
LEASED_IPMASQ4=leased
LEASED_BACKEND=vxlan
LEASED_DOCKER_OPTS="--bip=10.100.15.1/24 --mtu=1450 --ip-masq=false"
`,
		},
		{
			name: "IPv4 /30 without masquerading",
			env:  Env{Network: ipfam.Pair[netip.Prefix]{V4: net4}, Subnet: ipfam.Pair[netip.Prefix]{V4: netip.MustParsePrefix("10.100.0.4/30")}, MTU: 1500, Backend: "host-gw"},
			want: `# written by leased; do not edit
LEASED_NETWORK=10.100.0.0/16
LEASED_SUBNET=10.100.0.5/30
LEASED_MTU=1500
LEASED_IPMASQ=false
LEASED_IPMASQ4=dockerd
LEASED_BACKEND=host-gw
LEASED_DOCKER_OPTS="--bip=10.100.0.5/30 --mtu=1500"
`,
		},
		{
			name: "dual stack",
			env:  Env{Network: ipfam.Pair[netip.Prefix]{V4: net4, V6: net6}, Subnet: ipfam.Pair[netip.Prefix]{V4: sub4, V6: sub6}, MTU: 1450, IPMasq: true, Backend: "vxlan"},
			want: `# written by leased; do not edit
LEASED_NETWORK=10.100.0.0/16
LEASED_SUBNET=10.100.15.1/24
LEASED_NETWORK6=2001:db8:cd11::/48
LEASED_SUBNET6=2001:db8:cd11:0:8000::/80
LEASED_MTU=1450
LEASED_IPMASQ=true
LEASED_IPMASQ4=leased
LEASED_IPMASQ6=leased
LEASED_BACKEND=vxlan
LEASED_DOCKER_OPTS="--bip=10.100.15.1/24 --mtu=1450 --ipv6 --fixed-cidr-v6=2001:db8:cd11:0:8000::/80 --ip-masq=false"
`,
		},
		{
			// leased's Docker IPAM driver has the rest of each subnet.
			name: "dual stack, docker0 keeps a quarter",
			env:  Env{Network: ipfam.Pair[netip.Prefix]{V4: net4, V6: net6}, Subnet: ipfam.Pair[netip.Prefix]{V4: sub4, V6: netip.MustParsePrefix("2001:db8:cd11:7::/64")}, MTU: 1450, IPMasq: true, Backend: "vxlan", Docker0Bits: 2},
			want: `# written by leased; do not edit
LEASED_NETWORK=10.100.0.0/16
LEASED_SUBNET=10.100.15.1/24
LEASED_NETWORK6=2001:db8:cd11::/48
LEASED_SUBNET6=2001:db8:cd11:7::/64
LEASED_MTU=1450
LEASED_IPMASQ=true
LEASED_IPMASQ4=leased
LEASED_IPMASQ6=leased
LEASED_BACKEND=vxlan
LEASED_DOCKER0_SUBNET=10.100.15.1/26
LEASED_DOCKER0_SUBNET6=2001:db8:cd11:7::/66
LEASED_DOCKER_OPTS="--bip=10.100.15.1/26 --mtu=1450 --ipv6 --fixed-cidr-v6=2001:db8:cd11:7::/66 --ip-masq=false"
`,
		},
		{
			name: "IPv6 only /64",
			env:  Env{Network: ipfam.Pair[netip.Prefix]{V6: net6}, Subnet: ipfam.Pair[netip.Prefix]{V6: netip.MustParsePrefix("2001:db8:cd11:7::/64")}, MTU: 1500, Backend: "host-gw"},
			want: `# written by leased; do not edit
LEASED_NETWORK6=2001:db8:cd11::/48
LEASED_SUBNET6=2001:db8:cd11:7::/64
LEASED_MTU=1500
LEASED_IPMASQ=false
LEASED_IPMASQ4=dockerd
LEASED_IPMASQ6=none
LEASED_BACKEND=host-gw
LEASED_DOCKER_OPTS="--mtu=1500 --ipv6 --fixed-cidr-v6=2001:db8:cd11:7::/64"
`,
		},
		{
			name: "IPv6 only /80 proxy-ndp",
			env:  Env{Network: ipfam.Pair[netip.Prefix]{V6: netip.MustParsePrefix("2003:ab11::/64")}, Subnet: ipfam.Pair[netip.Prefix]{V6: netip.MustParsePrefix("2003:ab11:0:0:8000::/80")}, MTU: 1500, Backend: "proxy-ndp"},
			want: `# written by leased; do not edit
LEASED_NETWORK6=2003:ab11::/64
LEASED_SUBNET6=2003:ab11:0:0:8000::/80
LEASED_MTU=1500
LEASED_IPMASQ=false
LEASED_IPMASQ4=dockerd
LEASED_IPMASQ6=none
LEASED_BACKEND=proxy-ndp
LEASED_DOCKER_OPTS="--mtu=1500 --ipv6 --fixed-cidr-v6=2003:ab11:0:0:8000::/80"
`,
		},
		{
			// --ip-masq on an IPv6-only network: leased masquerades IPv6,
			// dockerd keeps masquerading docker0's own IPv4 subnet.
			name: "IPv6 only with ip-masq",
			env:  Env{Network: ipfam.Pair[netip.Prefix]{V6: net6}, Subnet: ipfam.Pair[netip.Prefix]{V6: sub6}, MTU: 1500, IPMasq: true, Backend: "host-gw"},
			want: `# written by leased; do not edit
LEASED_NETWORK6=2001:db8:cd11::/48
LEASED_SUBNET6=2001:db8:cd11:0:8000::/80
LEASED_MTU=1500
LEASED_IPMASQ=true
LEASED_IPMASQ4=dockerd
LEASED_IPMASQ6=leased
LEASED_BACKEND=host-gw
LEASED_DOCKER_OPTS="--mtu=1500 --ipv6 --fixed-cidr-v6=2001:db8:cd11:0:8000::/80"
`,
		},
		{
			name: "IPv6 only /126",
			env:  Env{Network: ipfam.Pair[netip.Prefix]{V6: netip.MustParsePrefix("2600:1f18:47b:ca03::/120")}, Subnet: ipfam.Pair[netip.Prefix]{V6: netip.MustParsePrefix("2600:1f18:47b:ca03::8/126")}, MTU: 9001, Backend: "host-gw"},
			want: `# written by leased; do not edit
LEASED_NETWORK6=2600:1f18:47b:ca03::/120
LEASED_SUBNET6=2600:1f18:47b:ca03::8/126
LEASED_MTU=9001
LEASED_IPMASQ=false
LEASED_IPMASQ4=dockerd
LEASED_IPMASQ6=none
LEASED_BACKEND=host-gw
LEASED_DOCKER_OPTS="--mtu=9001 --ipv6 --fixed-cidr-v6=2600:1f18:47b:ca03::8/126"
`,
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if err := tt.env.Validate(); err != nil {
				t.Fatalf("Validate: %v", err)
			}
			if got := string(tt.env.Render()); got != tt.want {
				t.Errorf("Render() =\n%s\nwant\n%s", got, tt.want)
			}
			// Round trip through a file.
			path := filepath.Join(t.TempDir(), "subnet.env")
			if _, err := Write(path, tt.env); err != nil {
				t.Fatal(err)
			}
			got, err := Read(path)
			if err != nil {
				t.Fatalf("Read: %v", err)
			}
			if got != tt.env {
				t.Errorf("Read(Write(e)) = %+v, want %+v", got, tt.env)
			}
		})
	}
}

func TestValidate(t *testing.T) {
	ok := Env{Network: ipfam.Pair[netip.Prefix]{V4: net4, V6: net6}, Subnet: ipfam.Pair[netip.Prefix]{V4: sub4, V6: sub6}, MTU: 1450, Backend: "vxlan"}
	tests := []struct {
		name   string
		modify func(*Env)
		want   string
	}{
		{"no family", func(e *Env) { *e = Env{MTU: 1500, Backend: "host-gw"} }, "no subnet"},
		{"subnet without network", func(e *Env) { e.Network.V4 = netip.Prefix{} }, "Network4"},
		{"subnet outside network", func(e *Env) { e.Subnet.V4 = netip.MustParsePrefix("10.101.0.0/24") }, "not inside"},
		{"subnet not masked", func(e *Env) { e.Subnet.V4 = netip.MustParsePrefix("10.100.15.1/24") }, "use 10.100.15.0/24"},
		{"wrong family", func(e *Env) { e.Subnet.V6 = sub4 }, "not an IPv6 prefix"},
		{"IPv4 /31", func(e *Env) { e.Subnet.V4 = netip.MustParsePrefix("10.100.0.2/31") }, "/30 or shorter"},
		{"IPv6 /127", func(e *Env) { e.Subnet.V6 = netip.MustParsePrefix("2001:db8:cd11::2/127") }, "/126 or shorter"},
		{"MTU zero", func(e *Env) { e.MTU = 0 }, "MTU 0"},
		{"MTU too small for IPv6", func(e *Env) { e.MTU = 1000 }, "1280 to 65535"},
		{"backend with space", func(e *Env) { e.Backend = "host gw" }, "backend name"},
		{"backend empty", func(e *Env) { e.Backend = "" }, "backend name"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			e := ok
			tt.modify(&e)
			err := e.Validate()
			if err == nil || !strings.Contains(err.Error(), tt.want) {
				t.Fatalf("Validate() = %v, want an error containing %q", err, tt.want)
			}
			if _, werr := Write(filepath.Join(t.TempDir(), "subnet.env"), e); werr == nil {
				t.Error("Write accepted an invalid Env")
			}
		})
	}
}

func TestWriteUnchanged(t *testing.T) {
	path := filepath.Join(t.TempDir(), "subnet.env")
	e := Env{Network: ipfam.Pair[netip.Prefix]{V4: net4}, Subnet: ipfam.Pair[netip.Prefix]{V4: sub4}, MTU: 1450, IPMasq: true, Backend: "vxlan"}
	changed, err := Write(path, e)
	if err != nil || !changed {
		t.Fatalf("first Write = %v, %v; want true, nil", changed, err)
	}
	before := stat(t, path)
	time.Sleep(10 * time.Millisecond) // let a rewrite show in mtime
	changed, err = Write(path, e)
	if err != nil || changed {
		t.Fatalf("second Write = %v, %v; want false, nil", changed, err)
	}
	after := stat(t, path)
	if before.Ino != after.Ino || before.Mtim != after.Mtim {
		t.Errorf("unchanged Write touched the file: inode %d -> %d, mtime %v -> %v", before.Ino, after.Ino, before.Mtim, after.Mtim)
	}

	e.MTU = 1400
	changed, err = Write(path, e)
	if err != nil || !changed {
		t.Fatalf("third Write = %v, %v; want true, nil", changed, err)
	}
	if got, err := Read(path); err != nil || got.MTU != 1400 {
		t.Errorf("Read after change = %+v, %v", got, err)
	}
	if after2 := stat(t, path); after2.Ino == after.Ino {
		t.Error("changed Write did not replace the file by rename")
	}
	entries, _ := os.ReadDir(filepath.Dir(path))
	if len(entries) != 1 {
		t.Errorf("directory holds %d entries, want only subnet.env (temporary files left behind?)", len(entries))
	}
}

func stat(t *testing.T, path string) *syscall.Stat_t {
	t.Helper()
	fi, err := os.Stat(path)
	if err != nil {
		t.Fatal(err)
	}
	return fi.Sys().(*syscall.Stat_t)
}

func TestWriteCreatesDirAndMode(t *testing.T) {
	old := syscall.Umask(0o077) // a strict umask must not change the file mode
	defer syscall.Umask(old)
	dir := filepath.Join(t.TempDir(), "run", "leased")
	path := filepath.Join(dir, "subnet.env")
	e := Env{Network: ipfam.Pair[netip.Prefix]{V6: net6}, Subnet: ipfam.Pair[netip.Prefix]{V6: sub6}, MTU: 1450, Backend: "host-gw"}
	if changed, err := Write(path, e); err != nil || !changed {
		t.Fatalf("Write = %v, %v", changed, err)
	}
	fi, err := os.Stat(path)
	if err != nil {
		t.Fatal(err)
	}
	if fi.Mode().Perm() != 0o644 {
		t.Errorf("file mode %v, want 0644", fi.Mode().Perm())
	}
	if di, err := os.Stat(dir); err != nil || !di.IsDir() {
		t.Errorf("directory not created: %v", err)
	}
}

func TestWriteFixesModeOnRewrite(t *testing.T) {
	path := filepath.Join(t.TempDir(), "subnet.env")
	if err := os.WriteFile(path, []byte("old\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := Write(path, Env{Network: ipfam.Pair[netip.Prefix]{V4: net4}, Subnet: ipfam.Pair[netip.Prefix]{V4: sub4}, MTU: 1450, Backend: "vxlan"}); err != nil {
		t.Fatal(err)
	}
	if fi, _ := os.Stat(path); fi.Mode().Perm() != 0o644 {
		t.Errorf("file mode %v, want 0644", fi.Mode().Perm())
	}
}

func TestReadMissing(t *testing.T) {
	_, err := Read(filepath.Join(t.TempDir(), "nope.env"))
	if !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("Read of a missing file = %v, want fs.ErrNotExist", err)
	}
}

func TestParse(t *testing.T) {
	good := Env{Network: ipfam.Pair[netip.Prefix]{V4: net4}, Subnet: ipfam.Pair[netip.Prefix]{V4: sub4}, MTU: 1450, IPMasq: true, Backend: "vxlan"}
	tests := []struct {
		name    string
		in      string
		want    Env
		wantErr string
	}{
		{
			name: "comments, blanks, unknown keys, quotes, spaces",
			in: "# hand-edited\n\n  LEASED_NETWORK = 10.100.0.0/16\nLEASED_SUBNET='10.100.15.1/24'\nFOO=bar\n" +
				"LEASED_MTU=\"1450\"\nLEASED_IPMASQ=true\nLEASED_BACKEND=vxlan\nLEASED_DOCKER_OPTS=\"--bip=1.2.3.4/24 --mtu=1\"\n",
			want: good,
		},
		{
			name: "flannel-style file missing our keys",
			in:   "FLANNEL_NETWORK=10.100.0.0/16\nFLANNEL_SUBNET=10.100.15.1/24\n",
			// nothing of ours
			wantErr: "no subnet",
		},
		{
			name:    "docker0's share not at the start of the lease",
			in:      "LEASED_NETWORK=10.100.0.0/16\nLEASED_SUBNET=10.100.15.1/24\nLEASED_MTU=1450\nLEASED_IPMASQ=true\nLEASED_BACKEND=vxlan\nLEASED_DOCKER0_SUBNET=10.100.15.65/26\n",
			wantErr: "LEASED_DOCKER0_SUBNET=10.100.15.65/26 is not the first part of the leased subnet 10.100.15.0/24",
		},
		{
			name:    "docker0's shares differ",
			in:      "LEASED_NETWORK=10.100.0.0/16\nLEASED_SUBNET=10.100.15.1/24\nLEASED_NETWORK6=2001:db8:cd11::/48\nLEASED_SUBNET6=2001:db8:cd11:7::/64\nLEASED_MTU=1450\nLEASED_IPMASQ=true\nLEASED_BACKEND=vxlan\nLEASED_DOCKER0_SUBNET=10.100.15.1/26\nLEASED_DOCKER0_SUBNET6=2001:db8:cd11:7::/65\n",
			wantErr: "keep different shares",
		},
		{
			name:    "not key=value",
			in:      "LEASED_NETWORK=10.100.0.0/16\nbogus line\n",
			wantErr: "line 2",
		},
		{
			name:    "bad prefix names line and key",
			in:      "LEASED_NETWORK=10.100.0.0/16\nLEASED_SUBNET=10.100.15.1\n",
			wantErr: "line 2: LEASED_SUBNET=",
		},
		{
			name:    "bad mtu",
			in:      "LEASED_MTU=big\n",
			wantErr: "line 1: LEASED_MTU",
		},
		{
			name:    "bad bool",
			in:      "LEASED_IPMASQ=yes\n",
			wantErr: "line 1: LEASED_IPMASQ",
		},
		{
			name:    "unterminated quote",
			in:      "LEASED_BACKEND=\"vxlan\n",
			wantErr: "line 1: LEASED_BACKEND: unterminated",
		},
		{
			name:    "subnet without network",
			in:      "LEASED_SUBNET=10.100.15.1/24\nLEASED_MTU=1450\nLEASED_IPMASQ=false\nLEASED_BACKEND=vxlan\n",
			wantErr: "LEASED_NETWORK and LEASED_SUBNET",
		},
		{
			name:    "missing mtu",
			in:      "LEASED_NETWORK=10.100.0.0/16\nLEASED_SUBNET=10.100.15.1/24\nLEASED_IPMASQ=false\nLEASED_BACKEND=vxlan\n",
			wantErr: "LEASED_MTU is missing",
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := Parse([]byte(tt.in))
			if tt.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
					t.Fatalf("Parse() = %+v, %v; want an error containing %q", got, err, tt.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if got != tt.want {
				t.Errorf("Parse() = %+v, want %+v", got, tt.want)
			}
		})
	}
}

func TestQuote(t *testing.T) {
	tests := []struct{ in, want string }{
		{"10.100.0.0/16", "10.100.0.0/16"},
		{"--bip=10.100.15.1/24 --mtu=1450", `"--bip=10.100.15.1/24 --mtu=1450"`},
		{`a "b" $c \d`, `"a \"b\" \$c \\d"`},
	}
	for _, tt := range tests {
		got := quote(tt.in)
		if got != tt.want {
			t.Errorf("quote(%q) = %s, want %s", tt.in, got, tt.want)
		}
		if back, err := unquote(got); err != nil || back != tt.in {
			t.Errorf("unquote(%s) = %q, %v; want %q", got, back, err, tt.in)
		}
	}
}

func FuzzParse(f *testing.F) {
	f.Add(Env{Network: ipfam.Pair[netip.Prefix]{V4: net4, V6: net6}, Subnet: ipfam.Pair[netip.Prefix]{V4: sub4, V6: sub6}, MTU: 1450, IPMasq: true, Backend: "vxlan"}.Render())
	f.Add([]byte("LEASED_SUBNET=\"10.0.0.1/8\nLEASED_MTU='x'\n"))
	f.Fuzz(func(t *testing.T, data []byte) {
		e, err := Parse(data)
		if err != nil {
			return
		}
		// Anything Parse accepts renders and parses back to itself.
		again, err := Parse(e.Render())
		if err != nil || again != e {
			t.Fatalf("Parse(Render(%+v)) = %+v, %v", e, again, err)
		}
	})
}

func TestWriteErrors(t *testing.T) {
	e := Env{Network: ipfam.Pair[netip.Prefix]{V4: net4}, Subnet: ipfam.Pair[netip.Prefix]{V4: sub4}, MTU: 1450, Backend: "vxlan"}
	tests := []struct {
		name  string
		setup func(dir string) string // returns the path to write
	}{
		{"parent is a file", func(dir string) string {
			os.WriteFile(filepath.Join(dir, "f"), nil, 0o644)
			return filepath.Join(dir, "f", "subnet.env")
		}},
		{"path is a directory", func(dir string) string {
			os.Mkdir(filepath.Join(dir, "subnet.env"), 0o755)
			return filepath.Join(dir, "subnet.env")
		}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			dir := t.TempDir()
			path := tt.setup(dir)
			if changed, err := Write(path, e); err == nil || changed {
				t.Fatalf("Write = %v, %v; want false and an error", changed, err)
			}
			entries, _ := os.ReadDir(dir)
			for _, en := range entries {
				if strings.Contains(en.Name(), ".tmp") {
					t.Errorf("temporary file %s left behind", en.Name())
				}
			}
		})
	}
}
