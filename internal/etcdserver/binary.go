package etcdserver

import (
	"fmt"
	"net"
	"os/exec"
	"strings"
	"time"
)

// Binary is an etcd member run from the etcd binary on $PATH (Debian's
// etcd-server package: etcd 3.4), as its own process: an etcd older than
// the embedded one, for the code paths that depend on the server version.
type Binary struct {
	ClientURL string
	Version   string // e.g. "3.4.23"
	cmd       *exec.Cmd
}

// StartBinary runs the etcd binary with its data in dir on free loopback
// ports and waits until it accepts connections.
func StartBinary(dir string) (*Binary, error) {
	bin, err := exec.LookPath("etcd")
	if err != nil {
		return nil, fmt.Errorf("etcd binary not found: install the etcd-server package (test/deps.sh does): %w", err)
	}
	out, _ := exec.Command(bin, "--version").Output()
	version := strings.TrimSpace(strings.TrimPrefix(strings.SplitN(string(out), "\n", 2)[0], "etcd Version:"))
	client, err := FreeAddr("127.0.0.1")
	if err != nil {
		return nil, err
	}
	peer, err := FreeAddr("127.0.0.1")
	if err != nil {
		return nil, err
	}
	b := &Binary{ClientURL: "http://" + client, Version: version}
	b.cmd = exec.Command(bin, "--data-dir", dir, "--name", "ext",
		"--listen-client-urls", b.ClientURL, "--advertise-client-urls", b.ClientURL,
		"--listen-peer-urls", "http://"+peer, "--initial-advertise-peer-urls", "http://"+peer,
		"--initial-cluster", "ext=http://"+peer)
	if err := b.cmd.Start(); err != nil {
		return nil, err
	}
	for deadline := time.Now().Add(20 * time.Second); ; time.Sleep(50 * time.Millisecond) {
		c, err := net.Dial("tcp", client)
		if err == nil {
			c.Close()
			return b, nil
		}
		if time.Now().After(deadline) {
			b.Stop()
			return nil, fmt.Errorf("etcd %s at %s not up after 20s: %w", version, client, err)
		}
	}
}

// Stop kills the process and waits for it.
func (b *Binary) Stop() {
	b.cmd.Process.Kill()
	b.cmd.Wait()
}
