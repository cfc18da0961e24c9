package agent

import (
	"context"
	"errors"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/leased/leased/internal/testutil/etcdtest"
	"github.com/leased/leased/pkg/backend"
	"github.com/leased/leased/pkg/lease"
	"github.com/leased/leased/pkg/subnetenv"
)

// An agent whose privilege check fails stops with that error once it
// knows the backend, without claiming: no lease key in etcd, no backend
// started, no subnet.env. (test/e2e runs the real binary without
// capabilities.)
func TestAgentStopsBeforeClaimingWithoutPrivileges(t *testing.T) {
	srv, cli := etcdtest.Start(t)
	etcdtest.Put(t, cli, cfgKey, `{"Network":"10.100.0.0/16","Backend":{"Type":"host-gw"}}`)
	rec := &recorder{}
	ia := newIdleAgent(t, srv.ClientURL, "a", "192.168.1.1", rec)
	var checked string
	ia.dp.checkPrivileges = func(typ string, _ backend.ExtIface, v4, v6 bool, _ backend.Options) error {
		checked = typ
		return &backend.PrivilegeError{Backend: typ, Problems: []string{"CAP_NET_ADMIN is missing"}}
	}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	ia.run(ctx)
	select {
	case <-ia.done:
	case <-time.After(30 * time.Second):
		t.Fatal("the agent did not stop within 30s")
	}
	var pe *backend.PrivilegeError
	if !errors.As(ia.err, &pe) || checked != backend.TypeHostGW {
		t.Fatalf("run returned %v (checked %q), want the PrivilegeError of host-gw", ia.err, checked)
	}
	if _, err := subnetenv.Read(ia.o.SubnetFile); err == nil {
		t.Error("subnet.env written")
	}
	if len(rec.starts) != 0 {
		t.Errorf("backend started: %v", rec.starts)
	}
	c, cancel2 := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel2()
	resp, err := ia.lease.cli.Get(c, lease.NewKeys("").Leases(), clientv3.WithPrefix())
	if err != nil {
		t.Fatal(err)
	}
	if len(resp.Kvs) != 0 {
		t.Errorf("etcd holds %d lease keys, want none: %s", len(resp.Kvs), resp.Kvs[0].Key)
	}
}
