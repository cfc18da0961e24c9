package dockeripam

import (
	"bytes"
	"context"
	"encoding/json"
	"github.com/leased/leased/pkg/ipfam"
	"net"
	"net/http"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/leased/leased/internal/testutil"
	"k8s.io/klog/v2"
)

// client speaks the plugin protocol to a driver over its unix socket, as
// dockerd does.
type client struct {
	t *testing.T
	c *http.Client
}

func serve(t *testing.T, state string, s4, s6 string) (*Driver, *client) {
	t.Helper()
	d, err := New(state, DefaultSplit, nil)
	if err != nil {
		t.Fatal(err)
	}
	var p4, p6 netip.Prefix
	if s4 != "" {
		p4 = netip.MustParsePrefix(s4)
	}
	if s6 != "" {
		p6 = netip.MustParsePrefix(s6)
	}
	if s4 != "" || s6 != "" {
		if err := d.SetSubnets(ipfam.Pair[netip.Prefix]{V4: p4, V6: p6}); err != nil {
			t.Fatal(err)
		}
	}
	sock := filepath.Join(t.TempDir(), "leased.sock")
	l, err := Listen(sock)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { d.Serve(ctx, l); close(done) }()
	t.Cleanup(func() { cancel(); <-done })
	hc := &http.Client{Timeout: 30 * time.Second, Transport: &http.Transport{
		DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			return (&net.Dialer{}).DialContext(ctx, "unix", sock)
		}}}
	return d, &client{t: t, c: hc}
}

// call posts req to method and returns the decoded answer and its "Err".
func (c *client) call(method string, req any) (map[string]any, string) {
	c.t.Helper()
	b, _ := json.Marshal(req)
	resp, err := c.c.Post("http://plugin/"+method, contentType, bytes.NewReader(b))
	if err != nil {
		c.t.Fatal(err)
	}
	defer resp.Body.Close()
	if ct := resp.Header.Get("Content-Type"); ct != contentType {
		c.t.Errorf("%s: Content-Type %q", method, ct)
	}
	var m map[string]any
	if err := json.NewDecoder(resp.Body).Decode(&m); err != nil {
		c.t.Fatalf("%s: %v", method, err)
	}
	e, _ := m["Err"].(string)
	if (e != "") != (resp.StatusCode != 200) {
		c.t.Errorf("%s: status %d with Err %q", method, resp.StatusCode, e)
	}
	return m, e
}

func (c *client) pool(req map[string]any) (id, pool string) {
	c.t.Helper()
	m, e := c.call("IpamDriver.RequestPool", req)
	if e != "" {
		c.t.Fatalf("RequestPool %v: %s", req, e)
	}
	return m["PoolID"].(string), m["Pool"].(string)
}

func (c *client) addr(id, want string, opts map[string]string) string {
	c.t.Helper()
	m, e := c.call("IpamDriver.RequestAddress", map[string]any{"PoolID": id, "Address": want, "Options": opts})
	if e != "" {
		c.t.Fatalf("RequestAddress %s %q: %s", id, want, e)
	}
	return m["Address"].(string)
}

var gw = map[string]string{optAddressType: gatewayType}

func TestProtocol(t *testing.T) {
	_, c := serve(t, filepath.Join(t.TempDir(), "ipam.json"), "10.100.15.0/24", "2001:db8:cd11:7::/64")
	if m, _ := c.call("Plugin.Activate", nil); len(m["Implements"].([]any)) != 1 || m["Implements"].([]any)[0] != "IpamDriver" {
		t.Errorf("Activate: %v", m)
	}
	if m, _ := c.call("IpamDriver.GetCapabilities", nil); m["RequiresRequestReplay"] != false {
		t.Errorf("GetCapabilities: %v", m)
	}
	if m, _ := c.call("IpamDriver.GetDefaultAddressSpaces", nil); m["LocalDefaultAddressSpace"] != LocalSpace || m["GlobalDefaultAddressSpace"] != GlobalSpace {
		t.Errorf("GetDefaultAddressSpaces: %v", m)
	}
	id4, p4 := c.pool(map[string]any{"AddressSpace": LocalSpace})
	id6, p6 := c.pool(map[string]any{"AddressSpace": LocalSpace, "V6": true})
	if p4 != "10.100.15.64/27" || p6 != "2001:db8:cd11:7:4000::/80" {
		t.Fatalf("pools %s %s", p4, p6)
	}
	if a := c.addr(id4, "", gw); a != "10.100.15.65/27" {
		t.Errorf("gateway %s", a)
	}
	if a := c.addr(id4, "", nil); a != "10.100.15.66/27" {
		t.Errorf("first container %s", a)
	}
	if a := c.addr(id4, "10.100.15.90", nil); a != "10.100.15.90/27" {
		t.Errorf("--ip %s", a)
	}
	if _, e := c.call("IpamDriver.RequestAddress", map[string]any{"PoolID": id4, "Address": "10.100.15.90"}); !strings.Contains(e, "10.100.15.90 is already in use") {
		t.Errorf("the same --ip twice: %q", e)
	}
	if _, e := c.call("IpamDriver.RequestAddress", map[string]any{"PoolID": id4, "Address": "10.100.15.1"}); !strings.Contains(e, "outside the network's subnet 10.100.15.64/27") {
		t.Errorf("--ip outside: %q", e)
	}
	if a := c.addr(id6, "", gw); a != "2001:db8:cd11:7:4000::1/80" {
		t.Errorf("v6 gateway %s", a)
	}
	if _, e := c.call("IpamDriver.ReleaseAddress", map[string]any{"PoolID": id4, "Address": "10.100.15.66"}); e != "" {
		t.Fatal(e)
	}
	if a := c.addr(id4, "", nil); a != "10.100.15.66/27" {
		t.Errorf("after a release %s, want the freed 10.100.15.66/27", a)
	}
	if _, e := c.call("IpamDriver.ReleasePool", map[string]any{"PoolID": id4}); e != "" {
		t.Fatal(e)
	}
	if _, p := c.pool(map[string]any{}); p != "10.100.15.64/27" {
		t.Errorf("after docker network rm the next pool is %s, want the freed 10.100.15.64/27", p)
	}
}

// The errors a user sees through docker network create.
func TestRequestPoolErrors(t *testing.T) {
	state := filepath.Join(t.TempDir(), "ipam.json")
	for _, tc := range []struct {
		name   string
		s4, s6 string
		req    map[string]any
		err    string
	}{
		{"no lease yet", "", "", map[string]any{}, "this host holds no leased subnet yet"},
		{"IPv6 not enabled", "10.100.15.0/24", "", map[string]any{"V6": true}, "IPv6 is not enabled in the leased network config"},
		{"IPv4 not enabled", "", "2001:db8::/64", map[string]any{}, "IPv4 is not enabled in the leased network config"},
		{"unknown option", "10.100.15.0/24", "", map[string]any{"Options": map[string]string{"size": "28"}}, `unknown IPAM option "size"`},
		{"outside", "10.100.15.0/24", "", map[string]any{"Pool": "172.20.0.0/16"}, "--subnet 172.20.0.0/16 is outside this host's leased subnet 10.100.15.0/24"},
		{"docker0's", "10.100.15.0/24", "", map[string]any{"Pool": "10.100.15.0/27"}, "overlaps docker0's share 10.100.15.0/26"},
		{"not a prefix", "10.100.15.0/24", "", map[string]any{"Pool": "bogus"}, `--subnet "bogus" is not a CIDR prefix`},
		{"swarm", "10.100.15.0/24", "", map[string]any{"AddressSpace": GlobalSpace}, "serves only local networks"},
		{"ip-range outside", "10.100.15.0/24", "", map[string]any{"SubPool": "10.100.15.0/28"}, `--ip-range "10.100.15.0/28" is not a network prefix inside the pool 10.100.15.64/27`},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, c := serve(t, state, tc.s4, tc.s6)
			if _, e := c.call("IpamDriver.RequestPool", tc.req); !strings.HasPrefix(e, "leased: ") || !strings.Contains(e, tc.err) {
				t.Fatalf("RequestPool %v: Err %q, want %q", tc.req, e, tc.err)
			}
		})
	}
	if _, err := os.Stat(state); err == nil {
		t.Errorf("refused requests wrote %s", state)
	}
}

func TestExhaustion(t *testing.T) {
	_, c := serve(t, filepath.Join(t.TempDir(), "ipam.json"), "10.100.15.0/24", "")
	seen := map[string]bool{}
	for i := 0; i < 6; i++ {
		_, p := c.pool(map[string]any{})
		if seen[p] {
			t.Fatalf("pool %s handed out twice", p)
		}
		seen[p] = true
	}
	if _, e := c.call("IpamDriver.RequestPool", map[string]any{}); !strings.Contains(e, "no free /27 left in this host's leased subnet 10.100.15.0/24") {
		t.Fatalf("7th pool: %q", e)
	}
	// A /30 holds the gateway and one container.
	_, c = serve(t, filepath.Join(t.TempDir(), "ipam.json"), "10.100.15.0/24", "")
	id, _ := c.pool(map[string]any{"Pool": "10.100.15.252/30"})
	c.addr(id, "", gw)
	if a := c.addr(id, "", nil); a != "10.100.15.254/30" {
		t.Fatalf("container %s", a)
	}
	if _, e := c.call("IpamDriver.RequestAddress", map[string]any{"PoolID": id}); !strings.Contains(e, "no free address left in 10.100.15.252/30") {
		t.Fatalf("3rd address: %q", e)
	}
}

// Pools and addresses survive a restart of the agent; a changed lease
// keeps the old pools (Docker still has them) and carves new ones from the
// new lease.
func TestStateSurvivesRestart(t *testing.T) {
	state := filepath.Join(t.TempDir(), "ipam.json")
	_, c := serve(t, state, "10.100.15.0/24", "2001:db8:cd11:7::/64")
	id, _ := c.pool(map[string]any{})
	c.addr(id, "", gw)
	c.addr(id, "", nil)

	d2, c2 := serve(t, state, "10.100.15.0/24", "2001:db8:cd11:7::/64")
	if ps := d2.Pools(); len(ps) != 1 || ps[0].Prefix.String() != "10.100.15.64/27" || len(ps[0].Addrs) != 2 {
		t.Fatalf("after a restart: %+v", ps)
	}
	if a := c2.addr(id, "", nil); a != "10.100.15.67/27" {
		t.Errorf("after a restart the next address is %s, want 10.100.15.67/27", a)
	}
	if _, p := c2.pool(map[string]any{}); p != "10.100.15.96/27" {
		t.Errorf("after a restart the next pool is %s", p)
	}

	d3, c3 := serve(t, state, "10.100.99.0/24", "")
	if len(d3.Pools()) != 2 {
		t.Fatalf("the lease change dropped pools: %+v", d3.Pools())
	}
	if _, p := c3.pool(map[string]any{}); p != "10.100.99.64/27" {
		t.Errorf("after a lease change the next pool is %s", p)
	}
	if _, e := c3.call("IpamDriver.ReleasePool", map[string]any{"PoolID": id}); e != "" {
		t.Errorf("releasing a pool outside the new lease: %s", e)
	}

	os.WriteFile(state, []byte("{bad"), 0o644)
	if _, err := New(state, DefaultSplit, nil); err == nil || !strings.Contains(err.Error(), "is corrupt") {
		t.Errorf("New on a corrupt state: %v", err)
	}
}

// A second agent does not take over a socket the first one answers on.
func TestListenRefusesLiveSocket(t *testing.T) {
	sock := filepath.Join(t.TempDir(), "leased.sock")
	l, err := Listen(sock)
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	if _, err := Listen(sock); err == nil || !strings.Contains(err.Error(), "in use by another process") {
		t.Fatalf("second Listen: %v", err)
	}
	l.Close()
	// A socket a killed agent left behind is replaced; a file that is not
	// a socket is left alone.
	stale, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	stale.(*net.UnixListener).SetUnlinkOnClose(false)
	stale.Close()
	l2, err := Listen(sock)
	if err != nil {
		t.Fatalf("Listen over a stale socket: %v", err)
	}
	l2.Close()
	other := filepath.Join(t.TempDir(), "file")
	os.WriteFile(other, []byte("x"), 0o600)
	if _, err := Listen(other); err == nil || !strings.Contains(err.Error(), "is not a socket") {
		t.Fatalf("Listen over a regular file: %v", err)
	}
	if b, _ := os.ReadFile(other); string(b) != "x" {
		t.Fatal("Listen changed a file that is not a socket")
	}
}

// When the host's lease changes, the agent's log names every pool left
// outside it and says what to do, once per change.
func TestLeaseChangeIsLogged(t *testing.T) {
	buf := testutil.CaptureKlog(t)
	d, err := New(filepath.Join(t.TempDir(), "ipam.json"), DefaultSplit, nil)
	if err != nil {
		t.Fatal(err)
	}
	d.SetSubnets(ipfam.Pair[netip.Prefix]{V4: netip.MustParsePrefix("10.100.15.0/24")})
	if _, err := d.RequestPool(PoolRequest{}); err != nil {
		t.Fatal(err)
	}
	want := "Docker network pool 10.100.15.64/27 is outside this host's leased subnets [10.100.99.0/24]: its containers are not reachable from other hosts; recreate the network (docker network rm, then create it again, or docker compose down and up) to move it into the lease"
	d.SetSubnets(ipfam.Pair[netip.Prefix]{V4: netip.MustParsePrefix("10.100.99.0/24")})
	klog.Flush()
	n := strings.Count(buf.String(), want)
	if n == 0 {
		t.Fatalf("the log lacks %q:\n%s", want, buf.String())
	}
	d.SetSubnets(ipfam.Pair[netip.Prefix]{V4: netip.MustParsePrefix("10.100.99.0/24")}) // the same lease again
	klog.Flush()
	if m := strings.Count(buf.String(), want); m != n {
		t.Fatalf("the same lease logged the pool again:\n%s", buf.String())
	}
}
