package agent

import (
	"github.com/leased/leased/pkg/ipfam"

	"context"
	"fmt"
	"net/netip"
	"strings"

	"github.com/leased/leased/internal/leaseview"
	"github.com/leased/leased/pkg/dockeripam"
	"github.com/leased/leased/pkg/metrics"
	"github.com/leased/leased/pkg/subnetenv"
	"k8s.io/klog/v2"
)

// dockerIPAM is the agent's Docker IPAM driver (--docker-ipam): it serves
// dockerd on its socket from the start and learns the host's subnets
// whenever subnet.env is written (see lease).
type dockerIPAM struct {
	o      *DockerIPAMOptions
	d      *dockeripam.Driver // nil when it could not start
	misfit string             // the split's error last logged
	// before is the subnet.env this process found at start (zero: none).
	// When it gave docker0 the whole of the subnets the host still holds
	// (written by a leased without the driver, or with --docker-ipam=false),
	// docker0 keeps them: shrinking it would renumber docker0 and restart
	// dockerd under running containers. The split applies from the next
	// boot (subnet.env lives in /run) or the next lease change.
	before     subnetenv.Env
	subnetFile string
	keptLogd   bool // the "docker0 keeps the whole lease" line was logged
}

// startDockerIPAM loads the driver's state and serves it until ctx is
// done. A driver that cannot start (a corrupt state file, a socket another
// process answers on) is logged and left off: the datapath does not depend
// on it, and docker network create then says the plugin is missing.
func startDockerIPAM(ctx context.Context, o *DockerIPAMOptions, subnetFile string) *dockerIPAM {
	di := &dockerIPAM{o: o, subnetFile: subnetFile}
	if env, err := subnetenv.Read(subnetFile); err == nil {
		di.before = env
	}
	if !o.On {
		return di
	}
	d, err := dockeripam.New(o.State, o.split(), func(n4, n6 int) {
		metrics.DockerIPAMPools.WithLabelValues("ipv4").Set(float64(n4))
		metrics.DockerIPAMPools.WithLabelValues("ipv6").Set(float64(n6))
	})
	if err != nil {
		klog.ErrorS(err, "the Docker IPAM driver is off: docker network create --ipam-driver=leased fails until this is fixed and leased restarted")
		return di
	}
	l, err := dockeripam.Listen(o.Socket)
	if err != nil {
		klog.ErrorS(err, "the Docker IPAM driver is off: cannot listen on its socket; docker network create --ipam-driver=leased fails until this is fixed and leased restarted", "socket", o.Socket)
		return di
	}
	di.d = d
	go func() {
		if err := d.Serve(ctx, l); err != nil {
			klog.ErrorS(err, "the Docker IPAM driver stopped serving", "socket", o.Socket)
		}
	}()
	klog.InfoS("Docker IPAM driver serving", "driver", dockeripam.Name, "socket", o.Socket, "state", o.State, "pools", len(d.Pools()))
	return di
}

// lease tells the driver this host's leased subnets and returns
// subnet.env's Docker0Bits: docker0's share, or 0 (the whole lease) when
// the driver is off or its pool sizes do not fit the lease.
func (di *dockerIPAM) lease(subnets ipfam.Pair[netip.Prefix]) int {
	if di == nil || !di.o.On {
		return 0
	}
	if b := di.before; b.Docker0Bits == 0 && ipfam.Any(b.Subnet) && b.Subnet == subnets {
		why := fmt.Errorf("docker0 keeps the whole of this host's leased subnets %v, which it had before the Docker IPAM driver was on (shrinking it would renumber docker0's containers): the driver takes its share after the next boot, or now: stop docker, remove %s, restart leased, start docker", validOnly(subnets), di.subnetFile)
		if di.d != nil {
			di.d.Docker0KeepsAll(subnets, why)
		}
		if !di.keptLogd {
			klog.Warning(why.Error())
			di.keptLogd = true
		}
		return 0
	}
	di.before = subnetenv.Env{} // a new lease: the split applies from now on
	err := di.o.split().Validate(subnets)
	if di.d != nil {
		err = di.d.SetSubnets(subnets)
	}
	if err != nil {
		if err.Error() != di.misfit {
			klog.ErrorS(err, "the Docker IPAM driver's split does not fit this host's lease: docker0 keeps the whole lease and docker network create --ipam-driver=leased fails; change the --docker-ipam-* flags")
			di.misfit = err.Error()
		}
		return 0
	}
	di.misfit = ""
	return di.o.Docker0Bits
}

// DockerPoolsStatus is `leased status`'s line on the Docker IPAM driver's
// pools, and false when one lies outside the lease.
func DockerPoolsStatus(state string, subnets ipfam.Pair[netip.Prefix]) (string, bool) {
	pools, err := dockeripam.ReadPools(state)
	if err != nil {
		return "docker ipam: " + err.Error(), false
	}
	if len(pools) == 0 {
		return fmt.Sprintf("docker ipam: no pools (%s)", state), true
	}
	ok := true
	var b strings.Builder
	fmt.Fprintf(&b, "docker ipam: %d pools for user-defined networks (%s):", len(pools), state)
	for _, p := range pools {
		fmt.Fprintf(&b, "\n  %s  %d addresses in use", p.Prefix, len(p.Addrs))
		lease := subnets.Get(ipfam.Of(p.Prefix.Addr()))
		if !lease.IsValid() || !lease.Contains(p.Prefix.Addr()) || p.Prefix.Bits() < lease.Bits() {
			b.WriteString("  OUTSIDE the lease: other hosts do not reach it; recreate the network")
			ok = false
		}
	}
	return b.String(), ok
}

// AddDockerPools puts this host's Docker network pools on its row of
// `leased leases -o json` (nothing when the state file is missing or
// unreadable: the command may run on a machine that is no host).
func AddDockerPools(rows []leaseview.Row, node, state string) {
	if node == "" {
		var err error
		if node, err = DefaultNodeName(); err != nil {
			return
		}
	}
	pools, err := dockeripam.ReadPools(state)
	if err != nil || len(pools) == 0 {
		return
	}
	for i := range rows {
		if rows[i].Node == node {
			for _, p := range pools {
				rows[i].DockerPools = append(rows[i].DockerPools, p.Prefix.String())
			}
		}
	}
}

// validOnly returns the valid prefixes of ps, IPv4 first.
func validOnly(ps ipfam.Pair[netip.Prefix]) []netip.Prefix {
	var out []netip.Prefix
	for _, p := range ipfam.Valid(ps) {
		out = append(out, p)
	}
	return out
}
