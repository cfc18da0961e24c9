package lease

import (
	"context"
	"errors"
	"io"
	"math"
	"sync"

	pb "go.etcd.io/etcd/api/v3/etcdserverpb"
	"google.golang.org/grpc"
	"google.golang.org/grpc/mem"
	"google.golang.org/protobuf/encoding/protowire"
	"google.golang.org/protobuf/proto"
)

// rawKV is a key-value of a rangeChunk: key and value point into the
// chunk's buffer.
type rawKV struct {
	key, value    []byte
	create, lease int64 // create revision, lease ID
}

// rangeChunk is one message of a RangeStream: its key-values, read in
// place from a pooled buffer. free returns the buffer (and kvs) to their
// pools; the key-values must not be used after.
type rangeChunk struct {
	kvs []rawKV
	buf mem.Buffer
}

func (c *rangeChunk) free() {
	c.buf.Free()
	kvs := c.kvs[:0]
	c.kvs = nil
	rawKVPool.Put(&kvs)
}

// rawKVPool holds the kvs slices of freed chunks.
var rawKVPool = sync.Pool{New: func() any { return new([]rawKV) }}

// rangeStream reads the keys [key, end) at revision rev (which a
// linearizable read must have returned) with etcd's RangeStream RPC (etcd
// 3.7 and later; older servers answer Unimplemented) and calls each with
// every chunk, in key order, as it arrives. each owns the chunk and must
// free it. It returns when the stream ends, with nil once every chunk was
// passed on.
//
// The stream goes over the client's connection, so it gets the client's
// authentication like any of its calls, but the responses are not
// unmarshalled into etcd's types: rangeStream reads the key-values it
// needs straight from the wire bytes, which keeps a listing of tens of
// thousands of records from allocating three objects per key.
func rangeStream(ctx context.Context, conn *grpc.ClientConn, key, end string, rev int64, each func(*rangeChunk)) error {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	desc := &grpc.StreamDesc{StreamName: "RangeStream", ServerStreams: true}
	cs, err := conn.NewStream(ctx, desc, "/etcdserverpb.KV/RangeStream",
		grpc.ForceCodecV2(rawCodec{}), grpc.MaxCallRecvMsgSize(math.MaxInt32), grpc.WaitForReady(true))
	if err != nil {
		return err
	}
	// Serializable: the revision is pinned, so the member's own copy is
	// the same data as a linearizable read would give, without another
	// round of raft agreement (a member that has not applied rev yet
	// refuses with ErrFutureRev, and the caller falls back).
	if err := cs.SendMsg(&pb.RangeRequest{Key: []byte(key), RangeEnd: []byte(end), Revision: rev, Serializable: true}); err != nil {
		return err
	}
	if err := cs.CloseSend(); err != nil {
		return err
	}
	for {
		var buf mem.Buffer
		err := cs.RecvMsg(&buf)
		if err != nil {
			if errors.Is(err, io.EOF) {
				return nil
			}
			return err
		}
		c := &rangeChunk{kvs: *rawKVPool.Get().(*[]rawKV), buf: buf}
		if c.kvs, err = appendRangeStreamResponse(c.kvs, buf.ReadOnlyData()); err != nil {
			c.free()
			return err
		}
		each(c)
	}
}

// rawCodec marshals requests like gRPC's proto codec and keeps responses as
// bytes: Unmarshal takes a *mem.Buffer, and the caller frees it.
type rawCodec struct{}

func (rawCodec) Name() string { return "proto" }

func (rawCodec) Marshal(v any) (mem.BufferSlice, error) {
	b, err := proto.Marshal(v.(proto.Message))
	return mem.BufferSlice{mem.SliceBuffer(b)}, err
}

func (rawCodec) Unmarshal(data mem.BufferSlice, v any) error {
	*v.(*mem.Buffer) = data.MaterializeToBuffer(mem.DefaultBufferPool())
	return nil
}

// Field numbers of etcd's messages (etcdserverpb/rpc.proto, mvccpb/kv.proto).
const (
	fieldStreamRangeResponse = 1 // RangeStreamResponse.range_response
	fieldRangeKvs            = 2 // RangeResponse.kvs
	fieldKVKey               = 1 // KeyValue.key
	fieldKVCreateRevision    = 2 // KeyValue.create_revision
	fieldKVValue             = 5 // KeyValue.value
	fieldKVLease             = 6 // KeyValue.lease
)

// appendRangeStreamResponse appends the key-values of an encoded
// RangeStreamResponse to kvs, pointing into b. Other fields are skipped.
func appendRangeStreamResponse(kvs []rawKV, b []byte) ([]rawKV, error) {
	for len(b) > 0 {
		f, n := nextField(b)
		if n < 0 {
			return kvs, protowire.ParseError(n)
		}
		b = b[n:]
		if f.num != fieldStreamRangeResponse || f.typ != protowire.BytesType {
			continue
		}
		for rr := f.v; len(rr) > 0; {
			f, n := nextField(rr)
			if n < 0 {
				return kvs, protowire.ParseError(n)
			}
			rr = rr[n:]
			if f.num != fieldRangeKvs || f.typ != protowire.BytesType {
				continue
			}
			var kv rawKV
			for m := f.v; len(m) > 0; {
				f, n := nextField(m)
				if n < 0 {
					return kvs, protowire.ParseError(n)
				}
				m = m[n:]
				switch {
				case f.num == fieldKVKey && f.typ == protowire.BytesType:
					kv.key = f.v
				case f.num == fieldKVValue && f.typ == protowire.BytesType:
					kv.value = f.v
				case f.num == fieldKVCreateRevision && f.typ == protowire.VarintType:
					kv.create = int64(f.x)
				case f.num == fieldKVLease && f.typ == protowire.VarintType:
					kv.lease = int64(f.x)
				}
			}
			kvs = append(kvs, kv)
		}
	}
	return kvs, nil
}

// field is one field of an encoded message: a bytes field's content is v,
// a varint's value x.
type field struct {
	num protowire.Number
	typ protowire.Type
	v   []byte
	x   uint64
}

// nextField decodes the first field of b and returns its length in b, or
// a negative number (see protowire.ParseError) when b is malformed.
func nextField(b []byte) (f field, n int) {
	t, n := uvarint(b)
	if n < 0 {
		return f, n
	}
	f.num, f.typ = protowire.Number(t>>3), protowire.Type(t&7)
	var m int
	switch f.typ {
	case protowire.BytesType:
		var l uint64
		if l, m = uvarint(b[n:]); m > 0 {
			if l > uint64(len(b)-n-m) {
				return f, -1 // io.ErrUnexpectedEOF
			}
			f.v, m = b[n+m:n+m+int(l)], m+int(l)
		}
	case protowire.VarintType:
		f.x, m = uvarint(b[n:])
	default:
		m = protowire.ConsumeFieldValue(f.num, f.typ, b[n:])
	}
	if m < 0 {
		return f, m
	}
	return f, n + m
}

// uvarint is protowire.ConsumeVarint, with the one-byte case inlined.
func uvarint(b []byte) (uint64, int) {
	if len(b) > 0 && b[0] < 0x80 {
		return uint64(b[0]), 1
	}
	return protowire.ConsumeVarint(b)
}
