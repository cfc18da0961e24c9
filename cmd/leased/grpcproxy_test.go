package main

import (
	"context"
	"net/netip"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/leased/leased/internal/agent"
	"github.com/leased/leased/internal/etcdserver"
	"github.com/leased/leased/internal/testutil/etcdtest"
	"github.com/leased/leased/internal/testutil/testcerts"
	"github.com/leased/leased/pkg/ipfam"
	"github.com/leased/leased/pkg/lease"
)

// The agent's etcd client works through an etcd gRPC proxy with TLS on
// both sides: the agent verifies the proxy's certificate and presents its
// own, and the proxy talks to a cluster that demands a client
// certificate. The agent claims a subnet (transactions), keeps its etcd
// lease alive and sees records in its prefix watch. (etcd 3.4's proxy
// cannot demand client certificates itself; see Documentation/scale.md.)
func TestAgentThroughTLSGRPCProxy(t *testing.T) {
	dir := t.TempDir()
	ca := testcerts.NewCA(t, dir, "ca")
	member := startTLSEtcd(t, ca, true)
	proxyServer, proxyServerKey := ca.Issue(t, "proxy-server", true, time.Now().Add(24*time.Hour))
	// etcd's proxy refuses a certificate towards the cluster that has a
	// Common Name ("cert has non empty Common Name"): the cluster would
	// take every proxied request as that user.
	proxyClient, proxyClientKey := ca.IssueWithoutCN(t, "proxy-client")
	p := etcdtest.GRPCProxy(t, "proxy", filepath.Join(dir, "proxy"), []string{member}, etcdserver.ProxyTLS{
		Cert: proxyServer, Key: proxyServerKey, ClientCA: ca.File,
		CA: ca.File, ClusterCert: proxyClient, ClusterKey: proxyClientKey,
	})
	if !strings.HasPrefix(p.ClientURL, "https://") {
		t.Fatalf("the proxy serves %s, want https", p.ClientURL)
	}
	agentCert, agentKey := ca.Issue(t, "agent", false, time.Now().Add(24*time.Hour))
	// A client that does not trust the proxy's CA is refused: the agent
	// verifies the proxy.
	wrongCA := testcerts.NewCA(t, dir, "wrong-ca")
	if err := tryClient(t, &agent.Options{EtcdEndpoints: p.ClientURL, EtcdCAFile: wrongCA.File, EtcdCertFile: agentCert, EtcdKeyFile: agentKey}); err == nil ||
		!strings.Contains(err.Error(), "certificate signed by unknown authority") {
		t.Errorf("a client that does not trust the proxy's certificate: %v; want certificate signed by unknown authority", err)
	}

	o := &agent.Options{EtcdEndpoints: p.ClientURL, EtcdCAFile: ca.File, EtcdCertFile: agentCert, EtcdKeyFile: agentKey}
	cli, err := agent.NewEtcdClient(o)
	if err != nil {
		t.Fatal(err)
	}
	defer cli.Close()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	cfgJSON := `{"Network":"10.0.0.0/16","SubnetLen":24,"Backend":{"Type":"host-gw"}}`
	if _, err := cli.Put(ctx, lease.NewKeys("").Config(), cfgJSON); err != nil {
		t.Fatal(err)
	}
	cfg, _, err := lease.ParseConfig([]byte(cfgJSON))
	if err != nil {
		t.Fatal(err)
	}
	// A 3 s TTL is renewed every second: a lost keep-alive path would end
	// the session within the 5 s this test waits.
	sess, err := lease.NewSession(ctx, cli, 3*time.Second, 10*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	defer sess.Orphan()
	reg := lease.NewRegistry(cli, "")
	rec, err := reg.Acquire(ctx, sess.Lease(), cfg, lease.Claim{Node: "host1", PublicIP: ipfam.Pair[netip.Addr]{V4: netip.MustParseAddr("192.0.2.1")}, BackendType: "host-gw"})
	if err != nil {
		t.Fatalf("claim through the proxy: %v", err)
	}
	batches := make(chan lease.Batch)
	go reg.Watch(ctx, batches) //nolint:errcheck // returns ctx.Err()
	var view lease.View
	view.Apply(<-batches)
	if got := view.Records["host1"]; got == nil || got.Subnet != rec.Subnet {
		t.Fatalf("the listing through the proxy holds %v, want host1 with %s", view.Records, rec.Subnet.V4)
	}
	if _, err := cli.Put(ctx, lease.NewKeys("").Lease("host2"), `{"Node":"host2","Subnet":"10.0.200.0/24","PublicIP":"192.0.2.2","BackendType":"host-gw"}`); err != nil {
		t.Fatal(err)
	}
	for view.Records["host2"] == nil {
		select {
		case b := <-batches:
			view.Apply(b)
		case <-ctx.Done():
			t.Fatal("the watch through the proxy did not deliver host2's record")
		}
	}
	select {
	case <-sess.Done():
		t.Fatal("the etcd lease was lost through the proxy")
	case <-time.After(5 * time.Second):
	}
	ttl, err := cli.TimeToLive(ctx, sess.Lease())
	if err != nil || ttl.TTL <= 0 {
		t.Fatalf("the etcd lease after 5 s of keep-alives through the proxy: %+v, %v", ttl, err)
	}
}
