package agent

import (
	"context"
	"errors"
	"fmt"

	"k8s.io/klog/v2"

	"github.com/leased/leased/pkg/ipfam"
)

// Run runs the agent for this host with the options o (already checked
// with Validate) until ctx is done: it takes the agent lock, connects to
// etcd, chooses the interface for inter-host traffic, starts the Docker
// IPAM driver and the HTTP endpoints, then runs the agent loop. It
// returns nil when ctx ends (the lease is left to expire on its own and
// the kernel state stays, for the next run), a usage error (ExitCode 2)
// when a setting no retry can fix is found, and a *backend.PrivilegeError
// when the agent lacks a privilege it needs.
func Run(ctx context.Context, o *Options) error {
	if err := holdAgentLock(ctx, o); err != nil {
		return nil
	}
	node := o.NodeName
	if node == "" {
		var err error
		if node, err = DefaultNodeName(); err != nil {
			return err
		}
	}
	// The monitor says why etcd cannot be used, and stops the agent
	// (exit status 2) when no retry can fix it.
	ctx, stopAgent := context.WithCancelCause(ctx)
	defer stopAgent(nil)
	mon := newEtcdMonitor(o)
	cli, err := mon.connect(ctx)
	if err != nil {
		if errors.Is(err, context.Canceled) {
			return nil
		}
		return err
	}
	defer cli.Close()
	go mon.run(ctx, cli, stopAgent)
	// gRPC connects on the first request; start now, so that the
	// connection is being set up while the interface is looked up.
	cli.ActiveConnection().Connect()
	ext, why, err := findExtIface(o)
	if err != nil {
		return fmt.Errorf("choosing the interface for inter-host traffic: %w", err)
	}
	if ext.Split() {
		l6 := ext.Link(ipfam.IPv6)
		klog.InfoS("Using interface", "family", "IPv4", "iface", ext.V4.Name, "chosenBy", why, "publicIP", ext.V4.Public, "mtu", ext.V4.MTU)
		klog.InfoS("Using interface", "family", "IPv6", "iface", l6.Name, "chosenBy", why, "publicIPv6", ext.V6.Public, "mtu", l6.MTU)
	} else {
		klog.InfoS("Using interface", "iface", ext.V4.Name, "chosenBy", why, "publicIP", ext.V4.Public, "publicIPv6", ext.V6.Public, "mtu", ext.V4.MTU)
	}
	a := newAgent(o, cli, ext, node)
	a.etcd = mon
	a.lease.ipam = startDockerIPAM(ctx, &o.DockerIPAM, o.SubnetFile)
	if o.MetricsAddr != "" {
		if err := serveHTTP(ctx, o.MetricsAddr, &a.health); err != nil {
			return err
		}
	}
	err = a.run(ctx)
	var ue *usageError
	if cause := context.Cause(ctx); errors.As(cause, &ue) {
		return cause
	}
	if errors.Is(err, context.Canceled) {
		return nil
	}
	return err
}
