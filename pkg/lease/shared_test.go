package lease

import (
	"bytes"
	"encoding/json"
	"testing"
	"unsafe"
)

// TestDecodedRecordsShareAndKeepTheirData checks the contract the agent
// relies on when it hands a record's Node and BackendData to the backend
// without copying them (backend.Backend.SetPeers): a decoded record's node
// name is the key's string and its backend type one constant, and decoding
// into a record again (Record.UnmarshalJSON, a later lease of the node)
// never writes into the bytes of a BackendData handed out before.
func TestDecodedRecordsShareAndKeepTheirData(t *testing.T) {
	const v1 = `{"Node":"n1","Subnet":"10.1.2.0/24","PublicIP":"192.0.2.1","BackendType":"vxlan","BackendData":{"VtepMAC":"aa:aa:aa:aa:aa:aa"}}`
	const v2 = `{"Node":"n1","Subnet":"10.1.2.0/24","PublicIP":"192.0.2.1","BackendType":"vxlan","BackendData":{"VtepMAC":"bb:bb:bb:bb:bb:bb"}}`
	key := string([]byte("n1"))
	r, err := DecodeRecord(key, []byte(v1))
	if err != nil {
		t.Fatal(err)
	}
	if unsafe.StringData(r.Node) != unsafe.StringData(key) {
		t.Error("the record's node name is a copy of the key's")
	}
	r2, err := DecodeRecord("n1", []byte(v2))
	if err != nil {
		t.Fatal(err)
	}
	if unsafe.StringData(r.BackendType) != unsafe.StringData(r2.BackendType) {
		t.Error("two records of one backend type hold a string each")
	}

	handed := r.BackendData // what the backend keeps
	want := bytes.Clone(handed)
	if err := json.Unmarshal([]byte(v2), r); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(handed, want) {
		t.Errorf("decoding into the record again rewrote the BackendData handed out: %s, want %s", handed, want)
	}
	if string(r.BackendData) != `{"VtepMAC":"bb:bb:bb:bb:bb:bb"}` {
		t.Errorf("decoded BackendData %s, want the new lease's", r.BackendData)
	}
	// A value without BackendData leaves the field as it was.
	if err := json.Unmarshal([]byte(`{"Node":"n1"}`), r); err != nil {
		t.Fatal(err)
	}
	if string(r.BackendData) != `{"VtepMAC":"bb:bb:bb:bb:bb:bb"}` {
		t.Errorf("a value without BackendData changed it to %s", r.BackendData)
	}
}
