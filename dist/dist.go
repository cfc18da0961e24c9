// Package dist holds the files operators install next to the leased binary
// — the systemd units, the docker.service drop-in, an example
// /etc/default/leased and example network configs — embedded so that tests
// can check them and start dockerd exactly as the drop-in does.
//
// It also has the small part of systemd's unit-file semantics those tests
// need: which ExecStart= a drop-in leaves in force, how an EnvironmentFile=
// is read, and how $VAR and ${VAR} expand in a command line. It is not a
// general unit parser.
package dist

import (
	"bufio"
	"bytes"
	"embed"
	"fmt"
	"strings"
)

// Files are the installable files, by path relative to dist/.
//
//go:embed leased.service leased-docker-restart.path leased-docker-restart.service leased.default docker.service.d/10-leased.conf examples/*.json
var Files embed.FS

// Paths of the embedded files.
const (
	LeasedUnit    = "leased.service"
	RestartPath   = "leased-docker-restart.path"
	RestartUnit   = "leased-docker-restart.service"
	DefaultEnv    = "leased.default"
	DockerDropIn  = "docker.service.d/10-leased.conf"
	ExamplesGlob  = "examples/*.json"
	SubnetEnvPath = "/run/leased/subnet.env"
)

// Units are the unit files (not drop-ins) that `systemd-analyze verify` must accept.
var Units = []string{LeasedUnit, RestartPath, RestartUnit}

// Setting is one assignment in a unit file.
type Setting struct {
	Section, Key, Value string
	Line                int
}

// ParseUnit returns the assignments of a unit file or drop-in in order,
// with continuation lines ("\" at the end) joined and comments dropped.
func ParseUnit(data []byte) ([]Setting, error) {
	var out []Setting
	section := ""
	sc := bufio.NewScanner(bytes.NewReader(data))
	var cont strings.Builder
	start := 0
	for n := 1; sc.Scan(); n++ {
		line := sc.Text()
		if cont.Len() == 0 {
			t := strings.TrimSpace(line)
			if t == "" || t[0] == '#' || t[0] == ';' {
				continue
			}
			if t[0] == '[' {
				if !strings.HasSuffix(t, "]") {
					return nil, fmt.Errorf("line %d: bad section header %q", n, t)
				}
				section = t[1 : len(t)-1]
				continue
			}
			start = n
		}
		if strings.HasSuffix(line, `\`) {
			cont.WriteString(strings.TrimSuffix(line, `\`) + " ")
			continue
		}
		cont.WriteString(line)
		full := strings.TrimSpace(cont.String())
		cont.Reset()
		k, v, ok := strings.Cut(full, "=")
		if !ok {
			return nil, fmt.Errorf("line %d: %q is not KEY=VALUE", start, full)
		}
		if section == "" {
			return nil, fmt.Errorf("line %d: %s outside a section", start, k)
		}
		out = append(out, Setting{Section: section, Key: strings.TrimSpace(k), Value: strings.TrimSpace(v), Line: start})
	}
	return out, sc.Err()
}

// Values returns the values of section.key in order, applying systemd's
// rule for list settings that an empty assignment resets the list.
func Values(settings []Setting, section, key string) []string {
	var out []string
	for _, s := range settings {
		if s.Section != section || s.Key != key {
			continue
		}
		if s.Value == "" {
			out = nil
			continue
		}
		out = append(out, s.Value)
	}
	return out
}

// ParseEnvironmentFile reads a file as systemd's EnvironmentFile= does, for
// the syntax leased writes: KEY=VALUE lines, '#' and ';' comments, values
// optionally in double quotes (with \" \\ \$ \` escapes) or single quotes.
func ParseEnvironmentFile(data []byte) (map[string]string, error) {
	env := map[string]string{}
	sc := bufio.NewScanner(bytes.NewReader(data))
	for n := 1; sc.Scan(); n++ {
		t := strings.TrimSpace(sc.Text())
		if t == "" || t[0] == '#' || t[0] == ';' {
			continue
		}
		k, v, ok := strings.Cut(t, "=")
		if !ok {
			return nil, fmt.Errorf("line %d: %q is not KEY=VALUE", n, t)
		}
		v = strings.TrimSpace(v)
		switch {
		case len(v) >= 2 && v[0] == '\'' && v[len(v)-1] == '\'':
			v = v[1 : len(v)-1]
		case len(v) >= 2 && v[0] == '"' && v[len(v)-1] == '"':
			var b strings.Builder
			in := v[1 : len(v)-1]
			for i := 0; i < len(in); i++ {
				if in[i] == '\\' && i+1 < len(in) && strings.IndexByte("\"\\$`", in[i+1]) >= 0 {
					i++
				}
				b.WriteByte(in[i])
			}
			v = b.String()
		case strings.ContainsAny(v, "\"'"):
			return nil, fmt.Errorf("line %d: stray quote in %q", n, v)
		}
		env[strings.TrimSpace(k)] = v
	}
	return env, sc.Err()
}

// ExpandCommand splits an Exec*= value into argv as systemd does for the
// forms the units here use: words separated by whitespace, "double" or
// 'single' quoted words, a leading "-", "@", "+", ":" or "!" prefix dropped,
// a word that is exactly $VAR replaced by VAR's value split at whitespace
// (no words when it is unset or empty), and ${VAR} replaced in place inside
// a word. An unset variable expands to the empty string.
func ExpandCommand(cmd string, env map[string]string) ([]string, error) {
	cmd = strings.TrimLeft(cmd, "-@+:!")
	var argv []string
	for i := 0; i < len(cmd); {
		if cmd[i] == ' ' || cmd[i] == '\t' {
			i++
			continue
		}
		var word strings.Builder
		quoted := false
		for i < len(cmd) && cmd[i] != ' ' && cmd[i] != '\t' {
			switch c := cmd[i]; c {
			case '"', '\'':
				end := strings.IndexByte(cmd[i+1:], c)
				if end < 0 {
					return nil, fmt.Errorf("unterminated %c quote in %q", c, cmd)
				}
				word.WriteString(cmd[i+1 : i+1+end])
				i += end + 2
				quoted = true
			case '\\':
				if i+1 < len(cmd) {
					word.WriteByte(cmd[i+1])
				}
				i += 2
			default:
				word.WriteByte(c)
				i++
			}
		}
		w := word.String()
		if !quoted && strings.HasPrefix(w, "$") && !strings.HasPrefix(w, "${") && isName(w[1:]) {
			argv = append(argv, strings.Fields(env[w[1:]])...)
			continue
		}
		expanded, err := expandBraces(w, env)
		if err != nil {
			return nil, err
		}
		argv = append(argv, expanded)
	}
	return argv, nil
}

func expandBraces(w string, env map[string]string) (string, error) {
	var b strings.Builder
	for {
		i := strings.Index(w, "${")
		if i < 0 {
			b.WriteString(w)
			return b.String(), nil
		}
		end := strings.IndexByte(w[i:], '}')
		if end < 0 {
			return "", fmt.Errorf("unterminated ${ in %q", w)
		}
		b.WriteString(w[:i])
		b.WriteString(env[w[i+2:i+end]])
		w = w[i+end+1:]
	}
}

func isName(s string) bool {
	if s == "" {
		return false
	}
	for i, c := range s {
		if c != '_' && (c < 'A' || c > 'Z') && (c < 'a' || c > 'z') && (i == 0 || c < '0' || c > '9') {
			return false
		}
	}
	return true
}

// DockerdArgs returns the argv of dockerd that the docker.service drop-in
// produces from a subnet.env: the drop-in's ExecStart= in force, expanded
// with the file's variables and with extra (e.g. Debian's DOCKER_OPTS) as
// the rest of the environment. argv[0] is the command as written ("dockerd").
func DockerdArgs(subnetEnv []byte, extra map[string]string) ([]string, error) {
	unit, err := Files.ReadFile(DockerDropIn)
	if err != nil {
		return nil, err
	}
	settings, err := ParseUnit(unit)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", DockerDropIn, err)
	}
	exec := Values(settings, "Service", "ExecStart")
	if len(exec) != 1 {
		return nil, fmt.Errorf("%s leaves %d ExecStart= in force, want 1", DockerDropIn, len(exec))
	}
	env, err := ParseEnvironmentFile(subnetEnv)
	if err != nil {
		return nil, fmt.Errorf("subnet.env: %w", err)
	}
	for k, v := range extra {
		if _, ok := env[k]; !ok {
			env[k] = v
		}
	}
	return ExpandCommand(exec[0], env)
}
