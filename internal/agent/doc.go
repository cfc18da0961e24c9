// Package agent is leased's node agent: it leases this host a subnet of
// the cluster network from etcd, writes it to subnet.env for dockerd and
// programs the kernel with routes to every other host's subnet.
//
// The agent is a few stages that each own their state and hand plain
// values on, in one direction (Documentation/architecture.md):
//
//   - the config keeper (configkeeper.go): the config applied, refusing
//     one that strands a subnet this host or a live peer holds;
//   - the lease keeper (leasekeeper.go, ownkeys.go, ownlocks.go, exclude.go): the etcd
//     session, the claim, republishing the record, subnet.env, and which
//     keys with this host's node name are its own;
//   - the peer tracker (peertracker.go): the accepted peers, what changed
//     since the backend was last told, the grace period after a lost lease;
//   - the datapath (datapath.go): the backend's lifetime and the changes
//     handed to it.
//
// The loop (agent.go) folds each watch batch into a lease.View, then runs
// one step: config, backend, lease, peers, changes to the datapath,
// subnet.env. Around it: Run (run.go) sets the agent up from Options — the
// agent lock (agentlock.go), the etcd client and the monitor that says why
// etcd cannot be used (etcd.go, etcdconn.go), the interface for inter-host
// traffic (iface.go), the Docker IPAM driver (dockeripam.go) and the HTTP
// endpoints (http.go). cmd/leased turns flags into Options and calls Run.
// For its operator commands the package also offers the agent's side of
// them: NewEtcdClient and WhyEtcd, CheckDatapath (status.go, for leased
// status), LockOutAgent and ReleaseOwnKeys (teardown.go, for leased
// teardown).
package agent
