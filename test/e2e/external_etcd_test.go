package e2e

import (
	"testing"
	"time"

	"github.com/leased/leased/internal/etcdserver"
	"github.com/leased/leased/internal/lab"
)

// The lab (and with it the agents) works against an external etcd: here
// the Debian etcd binary as its own process.
func TestLabWithExternalEtcd(t *testing.T) {
	ext, err := etcdserver.StartBinary(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(ext.Stop)
	url := ext.ClientURL
	l := up(t, lab.Config{Hosts: 2, Backend: "vxlan", EtcdEndpoints: []string{url}})
	for _, c := range l.Matrix(ctx(t), 10*time.Second) {
		if c.Err != nil {
			t.Errorf("%s → %s: %v", c.From.Name, c.To.Name, c.Err)
		}
	}
	rows, err := l.Client.Get(ctx(t), "/leased/network/leases/", clientv3WithPrefix())
	if err != nil || len(rows.Kvs) != 2 {
		t.Errorf("leases in the external etcd: %v %v", rows, err)
	}
}
