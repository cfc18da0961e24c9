package agent

import (
	"fmt"
	"net/netip"
	"path/filepath"
	"time"

	"github.com/leased/leased/pkg/dockeripam"
	"github.com/leased/leased/pkg/ipfam"
)

// Options are the agent's settings. cmd/leased fills them from its flags
// or LEASED_<FLAG> variables (the flag of each field is named beside it);
// the messages of Validate and of the etcd checks name the flags.
type Options struct {
	EtcdEndpoints    string        // --etcd-endpoints
	EtcdPrefix       string        // --etcd-prefix
	EtcdCAFile       string        // --etcd-cafile
	EtcdCertFile     string        // --etcd-certfile
	EtcdKeyFile      string        // --etcd-keyfile
	EtcdUsername     string        // --etcd-username
	EtcdPassword     string        // --etcd-password
	EtcdPasswordFile string        // --etcd-password-file
	Ifaces           []string      // --iface
	IfaceRegex       string        // --iface-regex
	PublicIP         string        // --public-ip
	PublicIPv6       string        // --public-ipv6
	SubnetFile       string        // --subnet-file
	NodeName         string        // --node-name
	LeaseTTL         time.Duration // --lease-ttl
	IPMasq           bool          // --ip-masq
	IPTablesForward  bool          // --iptables-forward-rules
	Resync           time.Duration // --resync-interval
	MetricsAddr      string        // --metrics-addr
	LeaseCache       string        // --lease-cache
	DockerIPAM       DockerIPAMOptions
}

// DockerIPAMOptions are the settings of the Docker IPAM driver
// (pkg/dockeripam), the --docker-ipam* flags.
type DockerIPAMOptions struct {
	On          bool   // --docker-ipam
	Socket      string // --docker-ipam-socket
	State       string // --docker-ipam-state
	Docker0Bits int    // --docker-ipam-docker0-bits
	PoolBits4   int    // --docker-ipam-pool-bits4
	PoolBits6   int    // --docker-ipam-pool-bits6
}

// DefaultLeaseTTL is how long a host's lease outlives its last keep-alive.
// Ten minutes: a host cut off from etcd (or an agent stopped for an
// upgrade) keeps its subnet that long with no chance of another host taking
// it, while a host that died for good is dropped by its peers within minutes
// rather than flannel's 24 hours. Renewals cost one keep-alive per host per
// TTL/3.
const DefaultLeaseTTL = 10 * time.Minute

// split is how the leased subnets are shared between docker0 and the
// Docker IPAM driver's pools.
func (d *DockerIPAMOptions) split() dockeripam.Split {
	return dockeripam.Split{Docker0Bits: d.Docker0Bits, PoolBits4: d.PoolBits4, PoolBits6: d.PoolBits6}
}

// docker0Share is subnet.env's split: docker0 keeps everything without the
// driver.
func (d *DockerIPAMOptions) docker0Share() int {
	if !d.On {
		return 0
	}
	return d.Docker0Bits
}

// LeaseCachePath is the lease cache file, "" when disabled.
func (o *Options) LeaseCachePath() string {
	switch o.LeaseCache {
	case "none":
		return ""
	case "":
		return filepath.Join(filepath.Dir(o.SubnetFile), "leases.cache")
	}
	return o.LeaseCache
}

// Validate checks the options no retry can fix; its errors name the flag
// and say what to write instead.
func (o *Options) Validate() error {
	if o.LeaseTTL < 5*time.Second {
		return fmt.Errorf("--lease-ttl %s is too short: use at least 5s (etcd rounds leases to seconds)", o.LeaseTTL)
	}
	for _, a := range []struct{ name, v string }{{"--public-ip", o.PublicIP}, {"--public-ipv6", o.PublicIPv6}} {
		if a.v == "" {
			continue
		}
		ip, err := netip.ParseAddr(a.v)
		if err != nil {
			return fmt.Errorf("%s %q is not an IP address", a.name, a.v)
		}
		if (a.name == "--public-ip") != ip.Is4() {
			return fmt.Errorf("%s %s has the wrong address family", a.name, a.v)
		}
	}
	if o.DockerIPAM.On {
		// The subnets' lengths are checked once the lease is known.
		if err := o.DockerIPAM.split().Validate(ipfam.Pair[netip.Prefix]{}); err != nil {
			return err
		}
	}
	if o.EtcdPassword != "" && o.EtcdPasswordFile != "" {
		return fmt.Errorf("give --etcd-password or --etcd-password-file, not both")
	}
	return o.ValidateEtcd()
}
