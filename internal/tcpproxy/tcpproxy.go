// Package tcpproxy relays TCP connections from a listener to a target. The
// lab uses it to bring an external etcd into a namespace, and tests use it
// to cut a client off from etcd and let it back.
package tcpproxy

import (
	"io"
	"net"
	"sync"
	"time"
)

// Proxy relays every connection accepted on its listener to the first of
// its targets that accepts a connection.
type Proxy struct {
	ln      net.Listener
	targets []string
	mu      sync.Mutex
	down    bool
	conns   map[net.Conn]bool
}

// New serves ln until Close. ln may have been created in another network
// namespace; the targets are dialled from the caller's.
func New(ln net.Listener, targets ...string) *Proxy {
	p := &Proxy{ln: ln, targets: targets, conns: map[net.Conn]bool{}}
	go p.serve()
	return p
}

// Loopback listens on a free loopback port and relays to targets.
func Loopback(targets ...string) (*Proxy, error) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return nil, err
	}
	return New(ln, targets...), nil
}

// Addr is the listener's address.
func (p *Proxy) Addr() net.Addr { return p.ln.Addr() }

// SetDown cuts every relayed connection and refuses new ones (true), or
// relays again (false).
func (p *Proxy) SetDown(down bool) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.down = down
	if down {
		p.closeConnsLocked()
	}
}

// Close stops accepting and cuts every relayed connection.
func (p *Proxy) Close() error {
	err := p.ln.Close()
	p.mu.Lock()
	defer p.mu.Unlock()
	p.closeConnsLocked()
	return err
}

func (p *Proxy) closeConnsLocked() {
	for c := range p.conns {
		c.Close()
	}
	clear(p.conns)
}

func (p *Proxy) serve() {
	for {
		c, err := p.ln.Accept()
		if err != nil {
			return
		}
		go p.pipe(c)
	}
}

func (p *Proxy) pipe(c net.Conn) {
	p.mu.Lock()
	down := p.down
	p.mu.Unlock()
	var up net.Conn
	if !down {
		for _, t := range p.targets {
			var err error
			if up, err = net.DialTimeout("tcp", t, 3*time.Second); err == nil {
				break
			}
		}
	}
	if up == nil {
		c.Close()
		return
	}
	p.mu.Lock()
	if p.down { // cut while dialling
		p.mu.Unlock()
		c.Close()
		up.Close()
		return
	}
	p.conns[c], p.conns[up] = true, true
	p.mu.Unlock()
	go func() { io.Copy(up, c); up.Close() }()
	io.Copy(c, up)
	c.Close()
	p.mu.Lock()
	delete(p.conns, c)
	delete(p.conns, up)
	p.mu.Unlock()
}
