package dockeripam

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"syscall"
	"time"

	"k8s.io/klog/v2"
)

// DefaultSocket is where dockerd looks for the plugin named leased.
const DefaultSocket = "/run/docker/plugins/" + Name + ".sock"

// contentType is the content type of Docker's plugin protocol.
const contentType = "application/vnd.docker.plugins.v1+json"

// Handler returns the HTTP handler of Docker's remote IPAM protocol:
// POST /Plugin.Activate and /IpamDriver.*, JSON in and out, errors as
// {"Err": "..."} with status 500 (dockerd shows them as
// "IpamDriver.<Method>: <message>").
func (d *Driver) Handler() http.Handler {
	mux := http.NewServeMux()
	handle := func(method string, fn func(body []byte) (any, error)) {
		mux.HandleFunc("/"+method, func(w http.ResponseWriter, r *http.Request) {
			var body []byte
			if r.Body != nil {
				var err error
				if body, err = readAll(r); err != nil {
					reply(w, method, nil, err)
					return
				}
			}
			resp, err := fn(body)
			reply(w, method, resp, err)
		})
	}
	handle("Plugin.Activate", func([]byte) (any, error) {
		return map[string][]string{"Implements": {"IpamDriver"}}, nil
	})
	handle("IpamDriver.GetCapabilities", func([]byte) (any, error) {
		// No replay: the pools and addresses are in the state file, so
		// dockerd need not (and does not) ask again when it restarts.
		return map[string]bool{"RequiresMACAddress": false, "RequiresRequestReplay": false}, nil
	})
	handle("IpamDriver.GetDefaultAddressSpaces", func([]byte) (any, error) {
		return map[string]string{"LocalDefaultAddressSpace": LocalSpace, "GlobalDefaultAddressSpace": GlobalSpace}, nil
	})
	handle("IpamDriver.RequestPool", func(b []byte) (any, error) {
		var r PoolRequest
		if err := decode(b, &r); err != nil {
			return nil, err
		}
		p, err := d.RequestPool(r)
		if err != nil {
			return nil, err
		}
		return map[string]any{"PoolID": p.ID(), "Pool": p.Prefix.String(), "Data": map[string]string{}}, nil
	})
	handle("IpamDriver.ReleasePool", func(b []byte) (any, error) {
		var r struct{ PoolID string }
		if err := decode(b, &r); err != nil {
			return nil, err
		}
		return struct{}{}, d.ReleasePool(r.PoolID)
	})
	handle("IpamDriver.RequestAddress", func(b []byte) (any, error) {
		var r struct {
			PoolID, Address string
			Options         map[string]string
		}
		if err := decode(b, &r); err != nil {
			return nil, err
		}
		a, err := d.RequestAddress(r.PoolID, r.Address, r.Options)
		if err != nil {
			return nil, err
		}
		return map[string]any{"Address": a.String(), "Data": map[string]string{}}, nil
	})
	handle("IpamDriver.ReleaseAddress", func(b []byte) (any, error) {
		var r struct{ PoolID, Address string }
		if err := decode(b, &r); err != nil {
			return nil, err
		}
		return struct{}{}, d.ReleaseAddress(r.PoolID, r.Address)
	})
	return mux
}

func readAll(r *http.Request) ([]byte, error) {
	defer r.Body.Close()
	return io.ReadAll(io.LimitReader(r.Body, 1<<20))
}

func decode(b []byte, v any) error {
	if len(b) == 0 {
		return nil
	}
	if err := json.Unmarshal(b, v); err != nil {
		return fmt.Errorf("malformed request: %v", err)
	}
	return nil
}

func reply(w http.ResponseWriter, method string, resp any, err error) {
	w.Header().Set("Content-Type", contentType)
	if err != nil {
		klog.InfoS("Docker IPAM request refused", "method", method, "err", err.Error())
		w.WriteHeader(http.StatusInternalServerError)
		json.NewEncoder(w).Encode(map[string]string{"Err": "leased: " + err.Error()})
		return
	}
	json.NewEncoder(w).Encode(resp)
}

// Listen opens the unix socket at path for dockerd: it creates the
// directory, replaces a stale socket left by a previous run, and refuses
// to take over one another process still answers on.
func Listen(path string) (net.Listener, error) {
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		return nil, fmt.Errorf("creating the Docker plugin directory: %w", err)
	}
	if fi, err := os.Lstat(path); err == nil {
		if fi.Mode()&os.ModeSocket == 0 {
			return nil, fmt.Errorf("%s exists and is not a socket: move it away, or give the agent another --docker-ipam-socket", path)
		}
		if c, err := net.DialTimeout("unix", path, time.Second); err == nil {
			c.Close()
			return nil, fmt.Errorf("%s is in use by another process (another leased agent?): stop it, or give this agent another --docker-ipam-socket", path)
		}
		if err := os.Remove(path); err != nil {
			return nil, fmt.Errorf("removing the stale socket: %w", err)
		}
	}
	l, err := net.Listen("unix", path)
	if err != nil {
		return nil, err
	}
	if err := os.Chmod(path, 0o660); err != nil {
		l.Close()
		return nil, err
	}
	return l, nil
}

// Serve answers dockerd on l until ctx is done, then closes l and removes
// the socket file (dockerd keeps its handle to the plugin and reconnects
// once a restarted agent listens again).
func (d *Driver) Serve(ctx context.Context, l net.Listener) error {
	srv := &http.Server{Handler: d.Handler(), ReadHeaderTimeout: 10 * time.Second}
	go func() {
		<-ctx.Done()
		c, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		srv.Shutdown(c)
	}()
	if ul, ok := l.(*net.UnixListener); ok {
		ul.SetUnlinkOnClose(true)
	}
	err := srv.Serve(l)
	if errors.Is(err, http.ErrServerClosed) || errors.Is(err, syscall.EINVAL) {
		return nil
	}
	return err
}
