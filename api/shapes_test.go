package api_test

import (
	"errors"
	"fmt"
	"go/ast"
	"go/parser"
	"go/token"
	"io/fs"
	"maps"
	"slices"
	"strconv"
	"strings"
	"testing"

	"github.com/getkin/kin-openapi/openapi3"
)

// The tests of this file hold the document to what client generators (oapi-codegen,
// openapi-typescript) need to give every field of an answer its type: they read a schema object
// by object, so a constraint that only a validator merging allOf members would understand
// (a property overlay without a type, a `required` naming a property declared in another
// member, a oneOf told apart only by trying each member) comes out as interface{} or as an
// optional field.

// schemaRoot is a schema the document uses, with a name for reports.
type schemaRoot struct {
	name string
	ref  *openapi3.SchemaRef
}

// schemaRoots returns every schema of the document: the components' schemas and responses, and
// each operation's request body and responses.
func schemaRoots(doc *openapi3.T) []schemaRoot {
	var roots []schemaRoot
	content := func(name string, c openapi3.Content) {
		for _, mt := range slices.Sorted(maps.Keys(c)) {
			roots = append(roots, schemaRoot{name + " " + mt, c[mt].Schema})
		}
	}
	for _, name := range slices.Sorted(maps.Keys(doc.Components.Schemas)) {
		roots = append(roots, schemaRoot{"#/components/schemas/" + name, doc.Components.Schemas[name]})
	}
	for _, name := range slices.Sorted(maps.Keys(doc.Components.Responses)) {
		content("#/components/responses/"+name, doc.Components.Responses[name].Value.Content)
	}
	for _, path := range doc.Paths.InMatchingOrder() {
		for method, op := range doc.Paths.Value(path).Operations() {
			name := method + " " + path
			if op.RequestBody != nil {
				content(name+" request", op.RequestBody.Value.Content)
			}
			for code, r := range op.Responses.Map() {
				content(name+" "+code, r.Value.Content)
			}
		}
	}
	return roots
}

// walkSchemas calls visit for every schema object reachable from the document's schemas through
// $ref, properties, allOf, oneOf, anyOf, items and additionalProperties, once each. It does
// not enter `not`: a negative constraint declares nothing a generator makes a type of.
func walkSchemas(doc *openapi3.T, visit func(where string, s *openapi3.Schema)) {
	seen := map[*openapi3.Schema]bool{}
	var walk func(where string, ref *openapi3.SchemaRef)
	walk = func(where string, ref *openapi3.SchemaRef) {
		if ref == nil || ref.Value == nil {
			return
		}
		if ref.Ref != "" {
			where = ref.Ref
		}
		s := ref.Value
		if seen[s] {
			return
		}
		seen[s] = true
		visit(where, s)
		for _, name := range slices.Sorted(maps.Keys(s.Properties)) {
			walk(where+"/properties/"+name, s.Properties[name])
		}
		for kind, list := range map[string]openapi3.SchemaRefs{"allOf": s.AllOf, "oneOf": s.OneOf, "anyOf": s.AnyOf} {
			for i, sub := range list {
				walk(fmt.Sprintf("%s/%s/%d", where, kind, i), sub)
			}
		}
		walk(where+"/items", s.Items)
		walk(where+"/additionalProperties", s.AdditionalProperties.Schema)
	}
	for _, root := range schemaRoots(doc) {
		walk(root.name, root.ref)
	}
}

// typed reports whether a property's schema says what it is: a $ref, a type, or an allOf of
// which some member does (`{description, allOf: [$ref]}`).
func typed(ref *openapi3.SchemaRef) bool {
	if ref.Ref != "" || len(ref.Value.Type.Slice()) > 0 {
		return true
	}
	return slices.ContainsFunc(ref.Value.AllOf, typed)
}

// TestPropertiesTyped: every property of every schema, allOf overlays included, declares a type
// or is a $ref. An overlay such as `state: {enum: [completed]}`, `lease: {required: [token]}`
// or a problem's `status: {enum: [409]}` is interface{} in oapi-codegen's models.
func TestPropertiesTyped(t *testing.T) {
	n := 0
	walkSchemas(load(t), func(where string, s *openapi3.Schema) {
		for _, name := range slices.Sorted(maps.Keys(s.Properties)) {
			n++
			if !typed(s.Properties[name]) {
				t.Errorf("%s: property %q has neither a type nor a $ref", where, name)
			}
		}
	})
	if n == 0 {
		t.Fatal("found no properties")
	}
}

// TestRequiredDeclared: a schema object that requires a property declares it next to the
// `required`. openapi-typescript makes a property required only where both meet, so
// `allOf: [Record, {required: [response]}]` left CompletedRecord.response optional. (Inside
// `not`, `required` only tests presence, and is not walked.)
func TestRequiredDeclared(t *testing.T) {
	walkSchemas(load(t), func(where string, s *openapi3.Schema) {
		for _, name := range s.Required {
			if s.Properties[name] == nil {
				t.Errorf("%s: requires %q but does not declare it in its properties", where, name)
			}
		}
	})
}

// pinned returns the values that the schema, with its allOf members, allows for the property
// name (the intersection of every enum given for it), and whether it requires the property.
func pinned(s *openapi3.Schema, name string) (values []any, required bool) {
	all := true // no enum seen yet: every value
	var visit func(s *openapi3.Schema)
	visit = func(s *openapi3.Schema) {
		required = required || slices.Contains(s.Required, name)
		if p := s.Properties[name]; p != nil && len(p.Value.Enum) > 0 {
			if all {
				values, all = slices.Clone(p.Value.Enum), false
			} else {
				values = slices.DeleteFunc(values, func(v any) bool { return !slices.Contains(p.Value.Enum, v) })
			}
		}
		for _, sub := range s.AllOf {
			visit(sub.Value)
		}
	}
	visit(s)
	return values, required
}

// TestOneOfDiscriminated: every oneOf or anyOf is a choice of named schemas with a discriminator
// whose mapping names each of them once, and each one requires the discriminating property
// and pins it to its own mapping value. Without it a generated client can only try the
// variants in turn (oapi-codegen's AsCompletedRecord decoded an in-progress record without
// error).
func TestOneOfDiscriminated(t *testing.T) {
	n := 0
	walkSchemas(load(t), func(where string, s *openapi3.Schema) {
		for kind, list := range map[string]openapi3.SchemaRefs{"oneOf": s.OneOf, "anyOf": s.AnyOf} {
			if len(list) == 0 {
				continue
			}
			n++
			d := s.Discriminator
			if d == nil || d.PropertyName == "" {
				t.Errorf("%s: %s without a discriminator", where, kind)
				continue
			}
			var refs []string
			for i, sub := range list {
				if sub.Ref == "" {
					t.Errorf("%s: %s member %d is not a $ref to a named schema", where, kind, i)
				}
				refs = append(refs, sub.Ref)
			}
			var mapped []string
			for _, value := range slices.Sorted(maps.Keys(d.Mapping)) {
				ref := d.Mapping[value].Ref
				mapped = append(mapped, ref)
				i := slices.Index(refs, ref)
				if i < 0 {
					t.Errorf("%s: mapping %q -> %s is not a member of the %s", where, value, ref, kind)
					continue
				}
				values, required := pinned(list[i].Value, d.PropertyName)
				if !required {
					t.Errorf("%s: %s does not require %q", where, ref, d.PropertyName)
				}
				if !slices.Equal(values, []any{value}) {
					t.Errorf("%s: %s allows %s = %v, want only %q", where, ref, d.PropertyName, values, value)
				}
			}
			slices.Sort(refs)
			slices.Sort(mapped)
			if !slices.Equal(refs, mapped) {
				t.Errorf("%s: discriminator mapping names %v, want each of %v once", where, mapped, refs)
			}
		}
	})
	if n == 0 {
		t.Fatal("found no oneOf: the GET answer is one")
	}
}

// TestSecurityExplicit: every operation says what auth it takes, `security: []` for none, so
// that tools need not guess from the absence of a global requirement.
func TestSecurityExplicit(t *testing.T) {
	for _, path := range load(t).Paths.InMatchingOrder() {
		for method, op := range load(t).Paths.Value(path).Operations() {
			if op.Security == nil {
				t.Errorf("%s %s: no security entry (security: [] when it takes no auth)", method, path)
			}
		}
	}
}

// serverProblems reads the server's problem table, internal/server/errors.go: the titles each
// problem name is sent with, and the fixed detail of those that do not show their error's text.
func serverProblems(t *testing.T) (titles map[string][]string, details map[string]string) {
	t.Helper()
	const file = "../internal/server/errors.go"
	f, err := parser.ParseFile(token.NewFileSet(), file, nil, 0)
	if errors.Is(err, fs.ErrNotExist) {
		t.Skipf("%s is not in this checkout", file)
	}
	if err != nil {
		t.Fatal(err)
	}
	str := func(e ast.Expr) (string, bool) {
		lit, ok := e.(*ast.BasicLit)
		if !ok || lit.Kind != token.STRING {
			return "", false
		}
		s, err := strconv.Unquote(lit.Value)
		return s, err == nil
	}
	titles, details = map[string][]string{}, map[string]string{}
	ast.Inspect(f, func(n ast.Node) bool {
		switch n := n.(type) {
		case *ast.CompositeLit:
			// problemType{"name", http.StatusX, "Title", showDetail}
			if id, ok := n.Type.(*ast.Ident); ok && id.Name == "problemType" && len(n.Elts) == 4 {
				name, ok1 := str(n.Elts[0])
				title, ok2 := str(n.Elts[2])
				if ok1 && ok2 && !slices.Contains(titles[name], title) {
					titles[name] = append(titles[name], title)
				}
			}
		case *ast.ValueSpec:
			// var details = map[string]string{"name": "Detail.", ...}
			if len(n.Names) == 1 && n.Names[0].Name == "details" && len(n.Values) == 1 {
				if lit, ok := n.Values[0].(*ast.CompositeLit); ok {
					for _, e := range lit.Elts {
						kv := e.(*ast.KeyValueExpr)
						k, ok1 := str(kv.Key)
						v, ok2 := str(kv.Value)
						if ok1 && ok2 {
							details[k] = v
						}
					}
				}
			}
		}
		return true
	})
	if len(titles) < len(problems) || len(details) == 0 {
		t.Fatalf("%s: found titles for %d problem names and %d details; has the table moved?", file, len(titles), len(details))
	}
	return titles, details
}

// TestProblemExamples: every problem example shows the title the server sends for its type and,
// where the server's detail is a fixed text, that text. (An example with another title, or a
// limit the server does not put in its detail, teaches clients to match on the wrong thing.)
func TestProblemExamples(t *testing.T) {
	titles, details := serverProblems(t)
	doc := load(t)
	n := 0
	check := func(where string, v any) {
		p, ok := v.(map[string]any)
		if !ok {
			t.Errorf("%s: example %v is not an object", where, v)
			return
		}
		n++
		typ, _ := p["type"].(string)
		name := strings.TrimPrefix(typ, "urn:idemsvc:problem:")
		if title := p["title"]; !slices.Contains(titles[name], fmt.Sprint(title)) {
			t.Errorf("%s: %s has title %q; the server sends %q", where, name, title, titles[name])
		}
		if want, fixed := details[name]; fixed && p["detail"] != want {
			t.Errorf("%s: %s has detail %q; the server sends %q", where, name, p["detail"], want)
		}
	}
	media := func(where string, c openapi3.Content) {
		mt := c["application/problem+json"]
		if mt == nil {
			return
		}
		if mt.Example != nil {
			check(where, mt.Example)
		}
		for _, name := range slices.Sorted(maps.Keys(mt.Examples)) {
			check(where+" examples/"+name, mt.Examples[name].Value.Value)
		}
	}
	for _, name := range slices.Sorted(maps.Keys(doc.Components.Responses)) {
		media("#/components/responses/"+name, doc.Components.Responses[name].Value.Content)
	}
	for _, path := range doc.Paths.InMatchingOrder() {
		for method, op := range doc.Paths.Value(path).Operations() {
			for code, r := range op.Responses.Map() {
				if r.Ref == "" {
					media(method+" "+path+" "+code, r.Value.Content)
				}
			}
		}
	}
	if n == 0 {
		t.Fatal("found no problem examples")
	}
}
