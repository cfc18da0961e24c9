# leased — see README.md.
GO ?= go

.PHONY: build deps lab test bench clean

build:
	$(GO) build -o bin/leased ./cmd/leased

# System packages the lab and the tests need (apt-get, when missing).
deps:
	test/deps.sh

# The main job: a 3-host lab with real etcd, leases and cross-host traffic.
lab: deps build
	./bin/leased lab $(LAB_ARGS)

# Every test, as root (network namespaces, a real etcd, real kernel).
test: deps
	$(GO) vet ./...
	$(GO) test -count=1 -timeout 40m ./...
	for f in FuzzParseConfig FuzzDecodeRecord FuzzDecodeRecordFast FuzzParseSubnetKey; do \
	  $(GO) test -run '^$$' -fuzz "^$$f$$" -fuzztime 15s ./pkg/lease || exit 1; done

bench:
	$(GO) test -run '^$$' -bench . -benchtime 3x ./...

clean:
	rm -rf bin
