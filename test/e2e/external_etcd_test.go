package e2e

import (
	"net"
	"os/exec"
	"testing"
	"time"

	"github.com/leased/leased/internal/lab"
)

// The lab (and with it the agents) works against an external etcd: here
// the Debian etcd binary as its own process.
func TestLabWithExternalEtcd(t *testing.T) {
	bin, err := exec.LookPath("etcd")
	if err != nil {
		t.Fatal("etcd binary not found: install the etcd-server package (test/deps.sh does)")
	}
	port := freePort(t)
	peer := freePort(t)
	url := "http://127.0.0.1:" + port
	cmd := exec.Command(bin, "--data-dir", t.TempDir(), "--name", "ext",
		"--listen-client-urls", url, "--advertise-client-urls", url,
		"--listen-peer-urls", "http://127.0.0.1:"+peer, "--initial-advertise-peer-urls", "http://127.0.0.1:"+peer,
		"--initial-cluster", "ext=http://127.0.0.1:"+peer)
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })
	eventually(t, 20*time.Second, "etcd up", func() error {
		c, err := net.Dial("tcp", "127.0.0.1:"+port)
		if err == nil {
			c.Close()
		}
		return err
	})
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

func freePort(t *testing.T) string {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	_, p, _ := net.SplitHostPort(l.Addr().String())
	return p
}
