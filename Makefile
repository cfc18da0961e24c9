# leased — see README.md.
GO ?= go
# The version stamped into the binary and the package (dist/version.sh),
# computed once and passed to sub-makes, so that a commit made while
# make test runs cannot make its targets disagree.
ifndef VERSION
VERSION := $(shell dist/version.sh)
endif
export VERSION
LDFLAGS := -X main.version=$(VERSION)

.PHONY: build deps lab test bench bench-datapath deb clean

# The agent (static: no libc to map, copy it anywhere), and the
# lab/benchmark tool (which embeds an etcd server).
build:
	CGO_ENABLED=0 $(GO) build -ldflags "$(LDFLAGS)" -o bin/leased ./cmd/leased
	$(GO) build -o bin/leased-lab ./cmd/leased-lab

# The Debian package (bin/leased_<version>_<arch>.deb): a stripped static
# binary, the units, /etc/default/leased, docs, leased(8), bash completion.
deb:
	CGO_ENABLED=0 $(GO) build -trimpath -ldflags "-s -w $(LDFLAGS)" -o bin/deb/leased ./cmd/leased
	dist/deb/build.sh bin/deb/leased $(VERSION) bin

# System packages the lab and the tests need (apt-get, when missing).
deps:
	test/deps.sh

# The main job: a 3-host lab with real etcd, leases and cross-host traffic.
lab: deps build
	./bin/leased-lab lab $(LAB_ARGS)

# The datapath benchmark of Documentation/performance.md.
bench-datapath: deps build
	./bin/leased-lab bench-datapath

# Every test, as root (network namespaces, a real etcd, real kernel).
test: deps
	$(GO) vet ./...
	promtool check rules dist/prometheus/leased-rules.yml
	$(GO) test -count=1 -timeout 40m ./...
	CGO_ENABLED=1 $(GO) test -race -count=1 ./pkg/lease ./pkg/subnetenv
	$(MAKE) deb
	lintian --fail-on error bin/leased_$(VERSION)_*.deb
	for f in FuzzParseConfig FuzzDecodeRecord FuzzParseSubnetKey FuzzDecodeSnapshotRecord FuzzParseSnapshot; do \
	  $(GO) test -run '^$$' -fuzz "^$$f$$" -fuzztime 15s ./pkg/lease || exit 1; done

bench:
	$(GO) test -run '^$$' -bench . -benchtime 3x ./...

clean:
	rm -rf bin
