// Package doccheck holds tests that keep Documentation/ true to the code.
package doccheck

import (
	"go/ast"
	"go/parser"
	"go/token"
	"io/fs"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"testing"
)

// logged is one message the agent or its tools log at the default
// verbosity.
type logged struct {
	pos  string
	text string
}

// defaultLevelMessages returns the message strings of every klog call in
// the repository's non-test Go files that is printed at the default
// verbosity: klog.Info*, klog.Warning*, klog.Error* not behind klog.V(n).
func defaultLevelMessages(t *testing.T, root string) []logged {
	t.Helper()
	var out []logged
	fset := token.NewFileSet()
	err := filepath.WalkDir(root, func(path string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if d.IsDir() {
			switch d.Name() {
			case ".git", "testdata", "vendor", "Documentation", "dist":
				return filepath.SkipDir
			}
			return nil
		}
		if !strings.HasSuffix(path, ".go") || strings.HasSuffix(path, "_test.go") {
			return nil
		}
		f, err := parser.ParseFile(fset, path, nil, 0)
		if err != nil {
			return err
		}
		ast.Inspect(f, func(n ast.Node) bool {
			call, ok := n.(*ast.CallExpr)
			if !ok {
				return true
			}
			sel, ok := call.Fun.(*ast.SelectorExpr)
			if !ok {
				return true
			}
			pkg, ok := sel.X.(*ast.Ident) // klog.V(2).InfoS has a call here, not an identifier
			if !ok || pkg.Name != "klog" {
				return true
			}
			name := sel.Sel.Name
			if !strings.HasPrefix(name, "Info") && !strings.HasPrefix(name, "Warning") && !strings.HasPrefix(name, "Error") {
				return true
			}
			args := call.Args
			if name == "ErrorS" && len(args) > 0 {
				args = args[1:] // the error comes first
			}
			if len(args) == 0 {
				return true
			}
			lit, ok := args[0].(*ast.BasicLit)
			if !ok || lit.Kind != token.STRING {
				return true
			}
			s, err := strconv.Unquote(lit.Value)
			if err != nil {
				return true
			}
			out = append(out, logged{pos: fset.Position(lit.Pos()).String(), text: s})
			return true
		})
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return out
}

var verb = regexp.MustCompile(`%[-+# 0-9.]*[a-zA-Z%]`)

// TestDefaultLevelMessagesAreDocumented: every message a user sees in
// journalctl at the default verbosity is quoted somewhere in
// Documentation/ (troubleshooting.md for anything that needs action), so a
// user who greps the docs for it finds what it means. The longest part of
// the message between format verbs (its first 40 characters: the docs
// shorten long messages with "…") is what must appear.
func TestDefaultLevelMessagesAreDocumented(t *testing.T) {
	root := filepath.Join("..", "..")
	var docs strings.Builder
	pages, err := filepath.Glob(filepath.Join(root, "Documentation", "*.md"))
	if err != nil || len(pages) == 0 {
		t.Fatalf("no Documentation pages found: %v", err)
	}
	for _, p := range pages {
		b, err := os.ReadFile(p)
		if err != nil {
			t.Fatal(err)
		}
		docs.Write(b)
	}
	// Docs quote messages in Markdown, which may escape characters
	// and break long lines; compare on a normalised form.
	norm := func(s string) string {
		s = strings.NewReplacer("\\", "", "`", "", "\n", " ").Replace(s)
		return strings.Join(strings.Fields(s), " ")
	}
	all := norm(docs.String())
	msgs := defaultLevelMessages(t, root)
	if len(msgs) < 50 {
		t.Fatalf("found only %d log messages; the scan is broken", len(msgs))
	}
	for _, m := range msgs {
		key := ""
		for _, part := range verb.Split(m.text, -1) {
			if p := strings.TrimSpace(norm(part)); len(p) > len(key) {
				key = p
			}
		}
		if len(key) < 8 {
			continue // nothing quotable
		}
		if len(key) > 40 {
			key = key[:40] // docs shorten long messages with "…"
		}
		if !strings.Contains(all, key) {
			t.Errorf("%s: %q is logged at the default verbosity but not quoted in Documentation/ (add it to troubleshooting.md with cause and fix, or where it is explained)", m.pos, m.text)
		}
	}
}
