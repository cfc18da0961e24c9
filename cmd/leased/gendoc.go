package main

import (
	"flag"
	"fmt"
	"io"
	"slices"
	"strings"

	"k8s.io/klog/v2"

	"github.com/leased/leased/internal/agent"
)

// The man page and the bash completion are generated from the flag sets
// themselves (`leased man`, `leased completion bash`), so that they cannot
// drift from --help. make deb installs both.

// subcommands lists the operator commands, for the man page and completion.
var subcommands = []struct{ name, args, what string }{
	{"config validate", "[--host] FILE", "check a network config offline; exit 1 when it is invalid; --host also lists the parts this host routes itself"},
	{"config put", "[--dry-run] [--force] FILE", "validate a network config, check it against the live leases, then write it to <prefix>/config (a compare-and-swap)"},
	{"config get", "", "print the network config stored in etcd"},
	{"leases", "[-o table|json]", "print every host's lease"},
	{"status", "", "this host: its lease, subnet.env, and the kernel compared with the leases; exit 1 when they differ"},
	{"teardown", "[--release]", "remove what leased programmed on this host: routes of protocol 76, the VXLAN devices leased.4 and leased.6, the iptables chains LEASED-FWD and LEASED-POSTRTG and their jumps (sysctls are left); refused while the agent runs; --release also deletes this host's lease record and subnet locks in etcd and removes subnet.env"},
	{"version", "", "print the version"},
	{"man", "", "print this manual page (roff)"},
	{"completion bash", "", "print a bash completion script"},
	{"lab", "[flags]", "run leased-lab: a multi-host lab in network namespaces (needs the leased-lab binary)"},
	{"bench-datapath", "", "run leased-lab's datapath benchmark"},
}

// ownFlags and klogFlags return leased's own flags and klog's logging
// flags, each sorted by name.
func ownFlags() []*flag.Flag {
	fs := flag.NewFlagSet("leased", flag.ContinueOnError)
	register(fs, &agent.Options{})
	return allFlags(fs)
}

func klogFlags() []*flag.Flag {
	fs := flag.NewFlagSet("klog", flag.ContinueOnError)
	klog.InitFlags(fs)
	return allFlags(fs)
}

func allFlags(fs *flag.FlagSet) []*flag.Flag {
	var out []*flag.Flag
	fs.VisitAll(func(f *flag.Flag) { out = append(out, f) })
	slices.SortFunc(out, func(a, b *flag.Flag) int { return strings.Compare(a.Name, b.Name) })
	return out
}

// printGroupedDefaults prints leased's flags, then klog's, to w: the
// --help text.
func printGroupedDefaults(w io.Writer) {
	printFlags(w, ownFlags())
	fmt.Fprint(w, "\nlogging flags (klog):\n")
	printFlags(w, klogFlags())
}

func printFlags(w io.Writer, flags []*flag.Flag) {
	fs := flag.NewFlagSet("", flag.ContinueOnError)
	for _, f := range flags {
		fs.Var(f.Value, f.Name, f.Usage)
	}
	fs.SetOutput(w)
	fs.PrintDefaults()
}

// envName is the environment variable that sets flag name.
func envName(name string) string {
	return "LEASED_" + strings.ToUpper(strings.ReplaceAll(name, "-", "_"))
}

// roff escapes s for a man page line.
func roff(s string) string {
	s = strings.ReplaceAll(s, `\`, `\e`)
	s = strings.ReplaceAll(s, "-", `\-`)
	if strings.HasPrefix(s, ".") || strings.HasPrefix(s, "'") {
		s = `\&` + s
	}
	return s
}

// writeMan writes leased(8).
func writeMan(w io.Writer) {
	p := func(format string, a ...any) { fmt.Fprintf(w, format+"\n", a...) }
	p(`.TH LEASED 8 "" "leased %s" "System Administration"`, roff(buildVersion()))
	p(".SH NAME")
	p(`leased \- container network agent: leases this host a subnet from etcd for dockerd`)
	p(".SH SYNOPSIS")
	p(`.B leased`)
	p(`[\fIflags\fR]`)
	p(".br")
	p(`.B leased`)
	p(`\fIcommand\fR [\fIflags\fR] [\fIargs\fR]`)
	p(".SH DESCRIPTION")
	p("leased runs on every Docker host. It leases the host a slice of a cluster network from etcd " +
		"(an IPv6 subnet of any length up to /126 and, when enabled, an IPv4 subnet), writes it to " +
		"\\fI/run/leased/subnet.env\\fR for dockerd, and programs the kernel so that every other " +
		"host's slice is reachable: host\\-gw routes, VXLAN devices, or proxy NDP. It tells systemd " +
		"READY=1 once the lease is held, subnet.env is written and the datapath is programmed.")
	p(".PP")
	p("The network config is stored in etcd at \\fI<prefix>/config\\fR (see \\fBleased config put\\fR).")
	p(".SH COMMANDS")
	p("Without a command, leased runs the agent. Each command takes \\fB\\-h\\fR.")
	for _, c := range subcommands {
		p(".TP")
		if c.args != "" {
			p(`\fB%s\fR %s`, roff(c.name), roff(c.args))
		} else {
			p(`\fB%s\fR`, roff(c.name))
		}
		p("%s", roff(c.what))
	}
	p(".SH OPTIONS")
	p("Every option can also be set in the environment as \\fBLEASED_\\fR<FLAG>, upper case with " +
		"\"\\-\" as \"_\" (the systemd unit reads \\fI/etc/default/leased\\fR). Options on the command " +
		"line win over the environment.")
	for _, f := range ownFlags() {
		p(".TP")
		if f.DefValue != "" && f.DefValue != "[]" {
			p(`\fB\-\-%s\fR (\fB%s\fR; default: %s)`, roff(f.Name), envName(f.Name), roff(f.DefValue))
		} else {
			p(`\fB\-\-%s\fR (\fB%s\fR)`, roff(f.Name), envName(f.Name))
		}
		p("%s", roff(f.Usage))
	}
	p(".SS Logging options (klog)")
	for _, f := range klogFlags() {
		p(".TP")
		p(`\fB\-\-%s\fR`, roff(f.Name))
		p("%s", roff(f.Usage))
	}
	p(".SH EXIT STATUS")
	p(".TP")
	p("0")
	p("stopped by SIGTERM or SIGINT; the lease and the datapath stay in place until the lease expires.")
	p(".TP")
	p("1")
	p("a runtime error; the systemd unit restarts leased.")
	p(".TP")
	p("2")
	p("a usage error (a bad flag or LEASED_* value, bad etcd endpoints or credentials); the unit does not restart leased, as a restart cannot fix it.")
	p(".TP")
	p("4")
	p("leased lacks a privilege its backend needs (CAP_NET_ADMIN, CAP_NET_RAW, write access to /proc/sys/net); it exits before it claims anything, and the unit does not restart it.")
	p(".SH FILES")
	p(".TP")
	p(`\fI/run/leased/subnet.env\fR`)
	p("the host's subnets and dockerd's options (LEASED_DOCKER_OPTS), read by the docker.service drop-in.")
	p(".TP")
	p(`\fI/run/leased/agent.lock\fR`)
	p("locked (flock) by the running agent; \\fBleased teardown\\fR refuses to run while it is locked.")
	p(".TP")
	p(`\fI/etc/default/leased\fR`)
	p("the environment of leased.service.")
	p(".TP")
	p(`\fI/usr/share/doc/leased/examples/10\-leased.conf\fR`)
	p("the docker.service drop-in; install it as /etc/systemd/system/docker.service.d/10\\-leased.conf.")
	p(".SH SEE ALSO")
	p(`\fBdockerd\fR(8), \fBetcdctl\fR(1), \fBsystemctl\fR(1); /usr/share/doc/leased/ (running.md, configuration.md, troubleshooting.md)`)
}

// writeBashCompletion writes a bash completion script for leased.
func writeBashCompletion(w io.Writer) {
	var flags []string
	for _, f := range ownFlags() {
		flags = append(flags, "--"+f.Name)
	}
	for _, f := range klogFlags() {
		flags = append(flags, "--"+f.Name)
	}
	fmt.Fprintf(w, `# bash completion for leased (generated by: leased completion bash)
_leased() {
    local cur prev words cword
    _init_completion -s || return
    local flags="%s"
    case "${words[1]}" in
    config)
        if [[ $cword -eq 2 ]]; then
            COMPREPLY=($(compgen -W "validate put get" -- "$cur"))
            return
        fi
        if [[ ${words[2]} == validate || ${words[2]} == put ]] && [[ $cur != -* ]]; then
            _filedir
            return
        fi ;;
    teardown)
        flags="$flags --release" ;;
    completion)
        [[ $cword -eq 2 ]] && COMPREPLY=($(compgen -W "bash" -- "$cur"))
        return ;;
    esac
    if [[ $cur == -* ]]; then
        COMPREPLY=($(compgen -W "$flags" -- "$cur"))
        [[ ${COMPREPLY-} == *= ]] && compopt -o nospace
        return
    fi
    if [[ $cword -eq 1 ]]; then
        COMPREPLY=($(compgen -W "config leases status teardown version man completion lab bench-datapath help" -- "$cur"))
    fi
}
complete -F _leased leased
`, strings.Join(flags, " "))
}
