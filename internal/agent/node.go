package agent

import (
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"os"
	"strings"

	"github.com/leased/leased/pkg/lease"
)

// DefaultNodeName derives a stable node identity: the hostname when it is a
// valid node name, else a digest of /etc/machine-id. The identity, not the
// IP address, is what a host's subnet is remembered by.
func DefaultNodeName() (string, error) {
	if h, err := os.Hostname(); err == nil && lease.ValidNodeName(h) == nil && h != "localhost" {
		return h, nil
	}
	if id, err := os.ReadFile("/etc/machine-id"); err == nil && len(strings.TrimSpace(string(id))) > 0 {
		sum := sha256.Sum256([]byte(strings.TrimSpace(string(id))))
		return "node-" + hex.EncodeToString(sum[:6]), nil
	}
	return "", fmt.Errorf("cannot derive a node name from the hostname or /etc/machine-id: set --node-name")
}
