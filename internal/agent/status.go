package agent

import (
	"context"

	"github.com/leased/leased/pkg/backend"
	"github.com/leased/leased/pkg/lease"
)

// CheckDatapath compares this host's kernel with what an agent with the
// options o would program for node's lease self under cfg, given every
// lease record in etcd (for leased status): the interface o chooses, the
// backend of cfg, the peers cfg accepts. It returns the difference and
// how many records are accepted and refused as peers.
func CheckDatapath(ctx context.Context, o *Options, node string, cfg *lease.Config, self *lease.Record, records map[string]*lease.Record) (drift backend.Drift, accepted, refused int, err error) {
	ext, _, err := findExtIface(o)
	if err != nil {
		return drift, 0, 0, err
	}
	be, err := backend.New(cfg.Backend.Raw, ext, node, backend.Options{})
	if err != nil {
		return drift, 0, 0, err
	}
	ps := lease.NewPeerSet(cfg, self, records)
	peers, rejected := ps.Accepted(), ps.Rejected()
	drift, err = backend.Check(ctx, be, backendLocal(node, self, cfg), toPeers(peers))
	return drift, len(peers), len(rejected), err
}
