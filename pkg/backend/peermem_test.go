package backend

import (
	"context"
	"net/netip"
	"runtime"
	"testing"
	"unsafe"

	"github.com/leased/leased/pkg/backend/vtep"
)

// TestEnginePeerMemory measures the engine's peer list at 50,000 peers (the
// peers as kept by SetPeers, and their index by node) and checks that the
// engine keeps the caller's strings and BackendData instead of copies: the
// agent hands it its lease records' values, so a copy would hold every
// peer's data twice (clonePeer did, 64 bytes per vxlan peer). It also
// checks that UpdatePeers keeps the caller's values. Counted on the live
// heap after a collection, so the bound holds on a loaded machine.
func TestEnginePeerMemory(t *testing.T) {
	const n = 50_000
	peers := benchPeersOf(n, 0, TypeVXLAN) // dual-stack, a public address each
	k := newFakeKernel()
	e := newEngine(TypeVXLAN, ExtIface{V4: ExtLink{Name: "eth0", Index: 2, MTU: 1500}}, Options{}, k, hostGW{})
	heap := func() uint64 {
		runtime.GC()
		var m runtime.MemStats
		runtime.ReadMemStats(&m)
		return m.HeapAlloc
	}
	h0 := heap()
	// Not started: SetPeers only records the set, as for the agent's
	// first hand-over before Start.
	if err := e.SetPeers(context.Background(), peers); err != nil {
		t.Fatal(err)
	}
	h1 := heap()
	perPeer := float64(int64(h1)-int64(h0)) / n
	t.Logf("engine peer list and index: %.0f bytes per peer at %d peers (a Peer is %d bytes)", perPeer, n, 168)
	// 168 bytes a Peer and about 35 for the index by node; a copy of the
	// vxlan BackendData would add 64.
	if perPeer > 240 {
		t.Errorf("the engine holds %.0f bytes per peer, want at most 240 (does it copy the peers' data?)", perPeer)
	}
	e.mu.Lock()
	for i := range e.peers {
		if &e.peers[i].BackendData[0] != &peers[i].BackendData[0] || unsafeStringData(e.peers[i].Node) != unsafeStringData(peers[i].Node) {
			e.mu.Unlock()
			t.Fatalf("peer %s: the engine keeps a copy of the caller's node name or BackendData", peers[i].Node)
		}
	}
	e.mu.Unlock()

	up := peers[7]
	up.PublicIP.V4 = netip.MustParseAddr("100.100.0.1")
	up.BackendData = vtep.Data(up.Node)
	if err := e.UpdatePeers(context.Background(), []Peer{up}, nil); err != nil {
		t.Fatal(err)
	}
	e.mu.Lock()
	got := e.peers[e.idx.pos[up.Node]]
	e.mu.Unlock()
	if got.PublicIP != up.PublicIP || &got.BackendData[0] != &up.BackendData[0] {
		t.Errorf("after UpdatePeers the engine holds %v (a copy: %v), want the caller's peer", got.PublicIP, &got.BackendData[0] != &up.BackendData[0])
	}
	runtime.KeepAlive(peers)
}

// unsafeStringData returns where s's bytes are, to tell a shared string
// from a copy.
func unsafeStringData(s string) *byte { return unsafe.StringData(s) }
