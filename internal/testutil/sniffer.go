package testutil

import (
	"net"
	"sync"
	"testing"
	"time"
)

// Sniffer is a TCP server on a free loopback port that keeps the first
// bytes (up to 24, read within 3 s) of every connection, answers reply on
// it if reply is not nil, and closes it: it tells what a client speaks
// (a TLS handshake starts with 0x16, plaintext HTTP/2 with "PRI * HTTP/2")
// without a real server.
type Sniffer struct {
	ln     net.Listener
	reply  []byte
	mu     sync.Mutex
	firsts [][]byte
}

// NewSniffer starts a Sniffer that stops when t ends.
func NewSniffer(t testing.TB, reply []byte) *Sniffer {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	s := &Sniffer{ln: ln, reply: reply}
	t.Cleanup(func() { ln.Close() })
	go s.serve()
	return s
}

// Addr is the listener's host:port.
func (s *Sniffer) Addr() string { return s.ln.Addr().String() }

// Take returns the first bytes of each connection received since the
// last Take, in the order they were read.
func (s *Sniffer) Take() [][]byte {
	s.mu.Lock()
	defer s.mu.Unlock()
	f := s.firsts
	s.firsts = nil
	return f
}

func (s *Sniffer) serve() {
	for {
		c, err := s.ln.Accept()
		if err != nil {
			return
		}
		go func() {
			defer c.Close()
			c.SetReadDeadline(time.Now().Add(3 * time.Second))
			b := make([]byte, 24)
			n, _ := c.Read(b)
			s.mu.Lock()
			s.firsts = append(s.firsts, b[:n])
			s.mu.Unlock()
			if s.reply != nil {
				c.Write(s.reply)
			}
		}()
	}
}
