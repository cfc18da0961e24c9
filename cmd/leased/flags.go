package main

import (
	"flag"
	"fmt"
	"github.com/leased/leased/pkg/ipfam"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/leased/leased/pkg/dockeripam"
	"github.com/leased/leased/pkg/lease"
)

// options are the agent's settings, from flags or LEASED_<FLAG> variables.
type options struct {
	etcdEndpoints    string
	etcdPrefix       string
	etcdCAFile       string
	etcdCertFile     string
	etcdKeyFile      string
	etcdUsername     string
	etcdPassword     string
	etcdPasswordFile string
	ifaces           stringList
	ifaceRegex       string
	publicIP         string
	publicIPv6       string
	subnetFile       string
	nodeName         string
	leaseTTL         time.Duration
	ipMasq           bool
	iptablesForward  bool
	resync           time.Duration
	metricsAddr      string
	leaseCache       string
	dockerIPAM       dockerIPAMOptions
}

// dockerIPAMOptions are the flags of the Docker IPAM driver (pkg/dockeripam).
type dockerIPAMOptions struct {
	on          bool
	socket      string
	state       string
	docker0Bits int
	poolBits4   int
	poolBits6   int
}

// DefaultLeaseTTL is how long a host's lease outlives its last keep-alive.
// Ten minutes: a host cut off from etcd (or an agent stopped for an
// upgrade) keeps its subnet that long with no chance of another host taking
// it, while a host that died for good is dropped by its peers within minutes
// rather than flannel's 24 hours. Renewals cost one keep-alive per host per
// TTL/3.
const DefaultLeaseTTL = 10 * time.Minute

type stringList []string

func (s *stringList) String() string { return strings.Join(*s, ",") }
func (s *stringList) Set(v string) error {
	for _, p := range strings.Split(v, ",") {
		if p = strings.TrimSpace(p); p != "" {
			*s = append(*s, p)
		}
	}
	return nil
}

// register adds every agent flag.
func (o *options) register(fs *flag.FlagSet) {
	o.registerEtcd(fs)
	o.registerAgent(fs)
}

// registerEtcd adds the flags that say how to reach etcd (shared by the
// agent and the CLI commands).
func (o *options) registerEtcd(fs *flag.FlagSet) {
	fs.StringVar(&o.etcdEndpoints, "etcd-endpoints", "http://127.0.0.1:2379", "comma-separated etcd client URLs (http://HOST:PORT, https://HOST:PORT, unix:///PATH); all https:// (TLS) or all http://")
	fs.StringVar(&o.etcdPrefix, "etcd-prefix", lease.DefaultPrefix, "etcd key prefix of the network (config at <prefix>/config)")
	fs.StringVar(&o.etcdCAFile, "etcd-cafile", "", "CA bundle that signs the etcd server certificates")
	fs.StringVar(&o.etcdCertFile, "etcd-certfile", "", "client certificate for etcd")
	fs.StringVar(&o.etcdKeyFile, "etcd-keyfile", "", "client key for etcd")
	fs.StringVar(&o.etcdUsername, "etcd-username", "", "etcd user name")
	fs.StringVar(&o.etcdPassword, "etcd-password", "", "etcd password (prefer --etcd-password-file or LEASED_ETCD_PASSWORD: command lines are visible in /proc)")
	fs.StringVar(&o.etcdPasswordFile, "etcd-password-file", "", "file holding the etcd password")
}

func (o *options) registerAgent(fs *flag.FlagSet) {
	fs.Var(&o.ifaces, "iface", "interface (name or address) for inter-host traffic; repeatable, the first that exists is used")
	fs.StringVar(&o.ifaceRegex, "iface-regex", "", "regular expression of interface names to use when --iface is not given")
	fs.StringVar(&o.publicIP, "public-ip", "", "IPv4 address peers use to reach this host (default: the interface's)")
	fs.StringVar(&o.publicIPv6, "public-ipv6", "", "IPv6 address peers use to reach this host (default: the interface's)")
	fs.StringVar(&o.subnetFile, "subnet-file", "/run/leased/subnet.env", "where to write the leased subnets for dockerd")
	fs.StringVar(&o.nodeName, "node-name", "", "this host's node name (default: the hostname, else derived from /etc/machine-id); subnets are remembered by it")
	fs.DurationVar(&o.leaseTTL, "lease-ttl", DefaultLeaseTTL, "lease lifetime without keep-alive (Go duration, e.g. 10s, 24h)")
	fs.BoolVar(&o.ipMasq, "ip-masq", false, "masquerade traffic from this host's subnets that leaves the cluster network, IPv4 and IPv6 (dockerd is then told not to masquerade leased's IPv4 subnet)")
	fs.BoolVar(&o.iptablesForward, "iptables-forward-rules", true, "accept the cluster network's traffic in FORWARD (chain LEASED-FWD, jumped to after Docker's chains); false leaves FORWARD to the operator")
	fs.StringVar(&o.leaseCache, "lease-cache", "", "where the agent saves the lease set at exit, to resume the etcd watch from it on restart instead of reading every lease (default: leases.cache next to --subnet-file; \"none\" disables)")
	fs.StringVar(&o.metricsAddr, "metrics-addr", "", "serve /healthz, /readyz and /metrics on this address (e.g. 127.0.0.1:9464); off when empty")
	fs.DurationVar(&o.resync, "resync-interval", 10*time.Second, "how often the datapath is compared with the kernel in full")
	d := &o.dockerIPAM
	fs.BoolVar(&d.on, "docker-ipam", true, "serve the Docker IPAM driver \"leased\" (docker network create --ipam-driver=leased): pools for user-defined networks from this host's lease; docker0 then keeps only a share of the lease (see --docker-ipam-docker0-bits)")
	fs.StringVar(&d.socket, "docker-ipam-socket", dockeripam.DefaultSocket, "the IPAM driver's unix socket, where dockerd looks for plugins")
	fs.StringVar(&d.state, "docker-ipam-state", "/var/lib/leased/docker-ipam.json", "where the IPAM driver keeps the pools and addresses it handed out (must survive reboots, as Docker's networks do)")
	fs.IntVar(&d.docker0Bits, "docker-ipam-docker0-bits", dockeripam.DefaultSplit.Docker0Bits, "with --docker-ipam, docker0 keeps the first 1/2^N of each leased subnet (2: a /26 of a /24, a /66 of a /64); the rest is for user-defined networks")
	fs.IntVar(&d.poolBits4, "docker-ipam-pool-bits4", dockeripam.DefaultSplit.PoolBits4, "a user-defined network's IPv4 pool is 1/2^N of the leased subnet (3: /27s of a /24), unless it asks for a --subnet")
	fs.IntVar(&d.poolBits6, "docker-ipam-pool-bits6", dockeripam.DefaultSplit.PoolBits6, "a user-defined network's IPv6 pool is 1/2^N of the leased subnet (16: /80s of a /64), unless it asks for a --subnet")
}

// split is how the leased subnets are shared between docker0 and the
// Docker IPAM driver's pools.
func (d *dockerIPAMOptions) split() dockeripam.Split {
	return dockeripam.Split{Docker0Bits: d.docker0Bits, PoolBits4: d.poolBits4, PoolBits6: d.poolBits6}
}

// docker0Share is subnet.env's split: docker0 keeps everything without the
// driver.
func (d *dockerIPAMOptions) docker0Share() int {
	if !d.on {
		return 0
	}
	return d.docker0Bits
}

// applyEnv sets every flag not given on the command line from
// LEASED_<FLAG> (upper case, '-' as '_'), e.g. LEASED_ETCD_ENDPOINTS.
func applyEnv(fs *flag.FlagSet) error {
	set := map[string]bool{}
	fs.Visit(func(f *flag.Flag) { set[f.Name] = true })
	var err error
	fs.VisitAll(func(f *flag.Flag) {
		if set[f.Name] || err != nil {
			return
		}
		env := "LEASED_" + strings.ToUpper(strings.ReplaceAll(f.Name, "-", "_"))
		if v, ok := os.LookupEnv(env); ok {
			if e := fs.Set(f.Name, v); e != nil {
				err = fmt.Errorf("%s=%q: %w", env, v, e)
			}
		}
	})
	return err
}

// leaseCachePath is the lease cache file, "" when disabled.
func (o *options) leaseCachePath() string {
	switch o.leaseCache {
	case "none":
		return ""
	case "":
		return filepath.Join(filepath.Dir(o.subnetFile), "leases.cache")
	}
	return o.leaseCache
}

func (o *options) validate() error {
	if o.leaseTTL < 5*time.Second {
		return fmt.Errorf("--lease-ttl %s is too short: use at least 5s (etcd rounds leases to seconds)", o.leaseTTL)
	}
	for _, a := range []struct{ name, v string }{{"--public-ip", o.publicIP}, {"--public-ipv6", o.publicIPv6}} {
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
	if o.dockerIPAM.on {
		// The subnets' lengths are checked once the lease is known.
		if err := o.dockerIPAM.split().Validate(ipfam.Pair[netip.Prefix]{}); err != nil {
			return err
		}
	}
	if o.etcdPassword != "" && o.etcdPasswordFile != "" {
		return fmt.Errorf("give --etcd-password or --etcd-password-file, not both")
	}
	return o.validateEtcd()
}
