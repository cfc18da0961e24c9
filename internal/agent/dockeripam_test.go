package agent

import (
	"context"
	"github.com/leased/leased/pkg/ipfam"
	"net/netip"
	"path/filepath"
	"strings"
	"testing"

	"github.com/leased/leased/pkg/dockeripam"
	"github.com/leased/leased/pkg/metrics"
	"github.com/leased/leased/pkg/subnetenv"
	dto "github.com/prometheus/client_model/go"
)

// subnet.env's docker0 share: the configured one while the driver is on and
// its split fits the lease; the whole lease when it is off or does not fit
// (the driver then refuses pools, saying why).
func TestDockerIPAMDocker0Share(t *testing.T) {
	s4, s6 := netip.MustParsePrefix("10.100.15.0/24"), netip.MustParsePrefix("2001:db8:cd11:7::/64")
	small := netip.MustParsePrefix("10.100.15.0/28")
	for _, tc := range []struct {
		name string
		on   bool
		s4   netip.Prefix
		want int
	}{
		{"on", true, s4, 2},
		{"off", false, s4, 0},
		{"does not fit a /28", true, small, 0},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dir := t.TempDir()
			o := &DockerIPAMOptions{On: tc.on, Socket: filepath.Join(dir, "leased.sock"), State: filepath.Join(dir, "ipam.json"),
				Docker0Bits: 2, PoolBits4: 3, PoolBits6: 16}
			ctx, cancel := context.WithCancel(context.Background())
			defer cancel()
			di := startDockerIPAM(ctx, o, filepath.Join(dir, "subnet.env"))
			if got := di.lease(ipfam.Pair[netip.Prefix]{V4: tc.s4, V6: s6}); got != tc.want {
				t.Fatalf("docker0 share = %d, want %d", got, tc.want)
			}
			if !tc.on {
				if di.d != nil {
					t.Fatal("the driver runs with --docker-ipam=false")
				}
				return
			}
			_, err := di.d.RequestPool(dockeripam.PoolRequest{})
			if tc.want == 0 {
				if err == nil || !strings.Contains(err.Error(), "--docker-ipam-pool-bits4 3 makes pools of /31") {
					t.Fatalf("RequestPool on a lease the split does not fit: %v", err)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			var m dto.Metric
			metrics.DockerIPAMPools.WithLabelValues("ipv4").Write(&m)
			if n := m.GetGauge().GetValue(); n != 1 {
				t.Errorf("leased_docker_ipam_pools{family=\"ipv4\"} = %v after one pool, want 1", n)
			}
		})
	}
	var nilIPAM *dockerIPAM // agents built without Run (tests)
	if got := nilIPAM.lease(ipfam.Pair[netip.Prefix]{V4: s4, V6: s6}); got != 0 {
		t.Errorf("nil driver: docker0 share %d", got)
	}
}

// leased status lists the driver's pools and fails on one outside the
// lease (the host's lease changed under an existing network).
func TestDockerPoolsStatus(t *testing.T) {
	state := filepath.Join(t.TempDir(), "ipam.json")
	s4 := netip.MustParsePrefix("10.100.15.0/24")
	msg, ok := DockerPoolsStatus(state, ipfam.Pair[netip.Prefix]{V4: s4})
	if !ok || !strings.Contains(msg, "no pools") {
		t.Fatalf("no state file: %q %v", msg, ok)
	}
	d, err := dockeripam.New(state, dockeripam.DefaultSplit, nil)
	if err != nil {
		t.Fatal(err)
	}
	d.SetSubnets(ipfam.Pair[netip.Prefix]{V4: s4})
	if _, err := d.RequestPool(dockeripam.PoolRequest{}); err != nil {
		t.Fatal(err)
	}
	msg, ok = DockerPoolsStatus(state, ipfam.Pair[netip.Prefix]{V4: s4})
	if !ok || !strings.Contains(msg, "1 pools for user-defined networks") || !strings.Contains(msg, "10.100.15.64/27  0 addresses in use") {
		t.Fatalf("one pool: %q %v", msg, ok)
	}
	msg, ok = DockerPoolsStatus(state, ipfam.Pair[netip.Prefix]{V4: netip.MustParsePrefix("10.100.99.0/24")})
	if ok || !strings.Contains(msg, "10.100.15.64/27  0 addresses in use  OUTSIDE the lease") {
		t.Fatalf("after a lease change: %q %v", msg, ok)
	}
}

// An agent upgraded from a leased without the driver (or restarted after
// running with --docker-ipam=false) finds a subnet.env that gives docker0
// the whole lease: docker0 keeps it while the host holds the same subnets,
// so dockerd is not restarted with a smaller --bip under running
// containers, and the driver refuses pools saying why and what to do. A
// new lease (or no subnet.env, as after a boot) gets the split.
func TestDockerIPAMKeepsDocker0OnUpgrade(t *testing.T) {
	s4, s6 := netip.MustParsePrefix("10.100.15.0/24"), netip.MustParsePrefix("2001:db8:cd11:7::/64")
	other4 := netip.MustParsePrefix("10.100.16.0/24")
	for _, tc := range []struct {
		name   string
		before *subnetenv.Env
		lease4 netip.Prefix
		want   int
	}{
		{"whole lease before, same lease", &subnetenv.Env{Network: ipfam.Pair[netip.Prefix]{V4: netip.MustParsePrefix("10.100.0.0/16"), V6: netip.MustParsePrefix("2001:db8:cd11::/48")}, Subnet: ipfam.Pair[netip.Prefix]{V4: s4, V6: s6}, MTU: 1500, Backend: "host-gw"}, s4, 0},
		{"whole lease before, new lease", &subnetenv.Env{Network: ipfam.Pair[netip.Prefix]{V4: netip.MustParsePrefix("10.100.0.0/16"), V6: netip.MustParsePrefix("2001:db8:cd11::/48")}, Subnet: ipfam.Pair[netip.Prefix]{V4: s4, V6: s6}, MTU: 1500, Backend: "host-gw"}, other4, 2},
		{"split before", &subnetenv.Env{Network: ipfam.Pair[netip.Prefix]{V4: netip.MustParsePrefix("10.100.0.0/16"), V6: netip.MustParsePrefix("2001:db8:cd11::/48")}, Subnet: ipfam.Pair[netip.Prefix]{V4: s4, V6: s6}, MTU: 1500, Backend: "host-gw", Docker0Bits: 2}, s4, 2},
		{"no subnet.env", nil, s4, 2},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dir := t.TempDir()
			envFile := filepath.Join(dir, "subnet.env")
			if tc.before != nil {
				if _, err := subnetenv.Write(envFile, *tc.before); err != nil {
					t.Fatal(err)
				}
			}
			o := &DockerIPAMOptions{On: true, Socket: filepath.Join(dir, "leased.sock"), State: filepath.Join(dir, "ipam.json"),
				Docker0Bits: 2, PoolBits4: 3, PoolBits6: 16}
			ctx, cancel := context.WithCancel(context.Background())
			defer cancel()
			di := startDockerIPAM(ctx, o, envFile)
			for i := 0; i < 2; i++ { // the answer holds on every write of subnet.env
				if got := di.lease(ipfam.Pair[netip.Prefix]{V4: tc.lease4, V6: s6}); got != tc.want {
					t.Fatalf("write %d: docker0 share = %d, want %d", i, got, tc.want)
				}
			}
			_, err := di.d.RequestPool(dockeripam.PoolRequest{})
			if tc.want == 0 {
				if err == nil || !strings.Contains(err.Error(), "docker0 keeps the whole of this host's leased subnets") || !strings.Contains(err.Error(), "remove "+envFile) {
					t.Fatalf("RequestPool while docker0 keeps the whole lease: %v", err)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
		})
	}
}
