package main

import (
	"flag"
	"fmt"
	"os"
	"strings"
	"time"

	"github.com/leased/leased/internal/agent"
	"github.com/leased/leased/pkg/dockeripam"
	"github.com/leased/leased/pkg/lease"
)

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
func register(fs *flag.FlagSet, o *agent.Options) {
	registerEtcd(fs, o)
	registerAgent(fs, o)
}

// registerEtcd adds the flags that say how to reach etcd (shared by the
// agent and the CLI commands).
func registerEtcd(fs *flag.FlagSet, o *agent.Options) {
	fs.StringVar(&o.EtcdEndpoints, "etcd-endpoints", "http://127.0.0.1:2379", "comma-separated etcd client URLs (http://HOST:PORT, https://HOST:PORT, unix:///PATH); all https:// (TLS) or all http://")
	fs.StringVar(&o.EtcdPrefix, "etcd-prefix", lease.DefaultPrefix, "etcd key prefix of the network (config at <prefix>/config)")
	fs.StringVar(&o.EtcdCAFile, "etcd-cafile", "", "CA bundle that signs the etcd server certificates")
	fs.StringVar(&o.EtcdCertFile, "etcd-certfile", "", "client certificate for etcd")
	fs.StringVar(&o.EtcdKeyFile, "etcd-keyfile", "", "client key for etcd")
	fs.StringVar(&o.EtcdUsername, "etcd-username", "", "etcd user name")
	fs.StringVar(&o.EtcdPassword, "etcd-password", "", "etcd password (prefer --etcd-password-file or LEASED_ETCD_PASSWORD: command lines are visible in /proc)")
	fs.StringVar(&o.EtcdPasswordFile, "etcd-password-file", "", "file holding the etcd password")
}

func registerAgent(fs *flag.FlagSet, o *agent.Options) {
	fs.Var((*stringList)(&o.Ifaces), "iface", "interface (name or address) for inter-host traffic; repeatable, the first that exists is used")
	fs.StringVar(&o.IfaceRegex, "iface-regex", "", "regular expression of interface names to use when --iface is not given")
	fs.StringVar(&o.PublicIP, "public-ip", "", "IPv4 address peers use to reach this host (default: the interface's)")
	fs.StringVar(&o.PublicIPv6, "public-ipv6", "", "IPv6 address peers use to reach this host (default: the interface's)")
	fs.StringVar(&o.SubnetFile, "subnet-file", "/run/leased/subnet.env", "where to write the leased subnets for dockerd")
	fs.StringVar(&o.NodeName, "node-name", "", "this host's node name (default: the hostname, else derived from /etc/machine-id); subnets are remembered by it")
	fs.DurationVar(&o.LeaseTTL, "lease-ttl", agent.DefaultLeaseTTL, "lease lifetime without keep-alive (Go duration, e.g. 10s, 24h)")
	fs.BoolVar(&o.IPMasq, "ip-masq", false, "masquerade traffic from this host's subnets that leaves the cluster network, IPv4 and IPv6 (dockerd is then told not to masquerade leased's IPv4 subnet)")
	fs.BoolVar(&o.IPTablesForward, "iptables-forward-rules", true, "accept the cluster network's traffic in FORWARD (chain LEASED-FWD, jumped to after Docker's chains); false leaves FORWARD to the operator")
	fs.StringVar(&o.LeaseCache, "lease-cache", "", "where the agent saves the lease set at exit, to resume the etcd watch from it on restart instead of reading every lease (default: leases.cache next to --subnet-file; \"none\" disables)")
	fs.StringVar(&o.MetricsAddr, "metrics-addr", "", "serve /healthz, /readyz and /metrics on this address (e.g. 127.0.0.1:9464); off when empty")
	fs.DurationVar(&o.Resync, "resync-interval", 10*time.Second, "how often the datapath is compared with the kernel in full")
	d := &o.DockerIPAM
	fs.BoolVar(&d.On, "docker-ipam", true, "serve the Docker IPAM driver \"leased\" (docker network create --ipam-driver=leased): pools for user-defined networks from this host's lease; docker0 then keeps only a share of the lease (see --docker-ipam-docker0-bits)")
	fs.StringVar(&d.Socket, "docker-ipam-socket", dockeripam.DefaultSocket, "the IPAM driver's unix socket, where dockerd looks for plugins")
	fs.StringVar(&d.State, "docker-ipam-state", "/var/lib/leased/docker-ipam.json", "where the IPAM driver keeps the pools and addresses it handed out (must survive reboots, as Docker's networks do)")
	fs.IntVar(&d.Docker0Bits, "docker-ipam-docker0-bits", dockeripam.DefaultSplit.Docker0Bits, "with --docker-ipam, docker0 keeps the first 1/2^N of each leased subnet (2: a /26 of a /24, a /66 of a /64); the rest is for user-defined networks")
	fs.IntVar(&d.PoolBits4, "docker-ipam-pool-bits4", dockeripam.DefaultSplit.PoolBits4, "a user-defined network's IPv4 pool is 1/2^N of the leased subnet (3: /27s of a /24), unless it asks for a --subnet")
	fs.IntVar(&d.PoolBits6, "docker-ipam-pool-bits6", dockeripam.DefaultSplit.PoolBits6, "a user-defined network's IPv6 pool is 1/2^N of the leased subnet (16: /80s of a /64), unless it asks for a --subnet")
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

// etcdOptions reads the etcd flags of fs (registered by registerEtcd)
// into options, for checks that see only the flag set.
func etcdOptions(fs *flag.FlagSet) *agent.Options {
	get := func(name string) string {
		if f := fs.Lookup(name); f != nil {
			return f.Value.String()
		}
		return ""
	}
	return &agent.Options{EtcdEndpoints: get("etcd-endpoints"), EtcdPrefix: get("etcd-prefix"),
		EtcdCAFile: get("etcd-cafile"), EtcdCertFile: get("etcd-certfile"), EtcdKeyFile: get("etcd-keyfile"),
		EtcdUsername: get("etcd-username"), EtcdPassword: get("etcd-password"), EtcdPasswordFile: get("etcd-password-file")}
}
