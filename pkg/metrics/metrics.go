// Package metrics holds leased's Prometheus metrics. They are registered
// with the default registry (alongside the Go and process collectors) and
// served on --metrics-addr at /metrics. Documentation/metrics.md lists them.
package metrics

import (
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promauto"
)

var (
	// PeersKnown is the number of well-formed peer leases in etcd, before
	// the peer filter.
	PeersKnown = promauto.NewGauge(prometheus.GaugeOpts{
		Name: "leased_peers_known", Help: "Peer leases seen in etcd (other hosts), well-formed or not.",
	})
	// PeersProgrammed is the number of peers handed to the backend.
	PeersProgrammed = promauto.NewGauge(prometheus.GaugeOpts{
		Name: "leased_peers_programmed", Help: "Peers that passed the lease filter and were handed to the datapath.",
	})
	// PeersRejected is the number of peer leases refused by the filter.
	PeersRejected = promauto.NewGauge(prometheus.GaugeOpts{
		Name: "leased_peers_rejected", Help: "Peer leases refused as malformed, outside the network, overlapping or hostile.",
	})
	// ReconcileDuration times datapath passes by kind (full, quick).
	ReconcileDuration = promauto.NewHistogramVec(prometheus.HistogramOpts{
		Name:    "leased_reconcile_duration_seconds",
		Help:    "Duration of datapath reconcile passes: full passes list the kernel, quick ones apply a peer change.",
		Buckets: prometheus.ExponentialBuckets(0.0001, 4, 10), // 100µs .. 26s
	}, []string{"pass"})
	// ReconcileErrors counts failed kernel operations by object kind.
	ReconcileErrors = promauto.NewCounterVec(prometheus.CounterOpts{
		Name: "leased_reconcile_errors_total", Help: "Kernel operations that failed in reconcile passes, by object kind (route, neighbour, fdb entry, device, list).",
	}, []string{"kind"})
	// WatchRestarts counts re-established etcd watches by reason.
	WatchRestarts = promauto.NewCounterVec(prometheus.CounterOpts{
		Name: "leased_etcd_watch_restarts_total", Help: "etcd watch restarts: resumed after a disconnect, or relisted after a compaction.",
	}, []string{"reason"})
	// LeaseRenewals counts keep-alive responses for the host's lease.
	LeaseRenewals = promauto.NewCounter(prometheus.CounterOpts{
		Name: "leased_lease_renewals_total", Help: "Keep-alive answers received for this host's etcd lease.",
	})
	// LeaseFailures counts lost leases and failed grants.
	LeaseFailures = promauto.NewCounterVec(prometheus.CounterOpts{
		Name: "leased_lease_failures_total", Help: "Lease problems: a lease lost (no keep-alive answer within the TTL), or a grant that failed.",
	}, []string{"reason"})
	// NDPSolicitations counts Neighbor Solicitations seen by the proxy-NDP
	// responder, by outcome (answered, ignored).
	NDPSolicitations = promauto.NewCounterVec(prometheus.CounterOpts{
		Name: "leased_ndp_solicitations_total", Help: "Neighbor Solicitations seen by the proxy-ndp backend, by result: answered, or ignored (target outside this host's slice, sent by this host, or in present mode not present or not remembered under a flood).",
	}, []string{"result"})
	// Ready is 1 once the host is ready (lease held, subnet.env written,
	// datapath applied).
	Ready = promauto.NewGauge(prometheus.GaugeOpts{
		Name: "leased_ready", Help: "1 once the lease is held, subnet.env is written and the datapath applied.",
	})
	// EtcdReachable is 1 while the last check of the agent's etcd monitor
	// succeeded, 0 while etcd cannot be used (and before the first check).
	EtcdReachable = promauto.NewGauge(prometheus.GaugeOpts{
		Name: "leased_etcd_reachable", Help: "1 while etcd answers the agent's checks, 0 while it cannot be used.",
	})
	// DriftRepairs counts objects leased put back after something outside
	// leased changed or removed them, by kind (route, neighbour, fdb entry,
	// forwarding: the sysctls and iptables rules).
	DriftRepairs = promauto.NewCounterVec(prometheus.CounterOpts{
		Name: "leased_kernel_drift_repairs_total", Help: "Kernel objects restored after they were changed or removed outside leased, by kind (route, neighbour, fdb entry, forwarding).",
	}, []string{"kind"})
	// DockerIPAMPools is the number of pools the Docker IPAM driver holds
	// for user-defined networks on this host, by family (ipv4, ipv6).
	DockerIPAMPools = promauto.NewGaugeVec(prometheus.GaugeOpts{
		Name: "leased_docker_ipam_pools", Help: "Pools the Docker IPAM driver holds for user-defined Docker networks on this host, by family.",
	}, []string{"family"})
)

// The label values alerts compute increase() over are exported at 0 from
// the start: a series that first appears at 1 shows no increase.
func init() {
	for _, r := range []string{"lost", "grant"} {
		LeaseFailures.WithLabelValues(r)
	}
	for _, k := range []string{"route", "neighbour", "fdb entry", "forwarding"} {
		DriftRepairs.WithLabelValues(k)
	}
}

// buildInfo is 1, labelled with the version and the Go version.
var buildInfo = promauto.NewGaugeVec(prometheus.GaugeOpts{
	Name: "leased_build_info", Help: "Always 1; the labels give the version of leased and of Go it was built with.",
}, []string{"version", "goversion"})

// SetBuildInfo sets leased_build_info{version,goversion} to 1.
func SetBuildInfo(version, goVersion string) {
	buildInfo.WithLabelValues(version, goVersion).Set(1)
}
