package pipeline

import (
	"reflect"
	"testing"
)

// A run record keeps parameters indented; lists and objects read back from
// it are the same parameters as the canonical compact form.
func TestChangedParamsIgnoresLayout(t *testing.T) {
	prev := []byte("{\n  \"lr\": 0.01,\n  \"targets\": [\n    \"q_proj\",\n    \"v_proj\"\n  ],\n  \"m\": {\"a\": 1}\n}")
	cur := []byte(`{"lr":0.02,"targets":["q_proj","v_proj"],"m":{"a":1}}`)
	if got := changedParams(prev, cur); !reflect.DeepEqual(got, []string{"lr"}) {
		t.Errorf("changed %v, want [lr]", got)
	}
	cur = []byte(`{"lr":0.01,"targets":["q_proj"],"m":{"a":1},"new":null}`)
	if got := changedParams(prev, cur); !reflect.DeepEqual(got, []string{"new", "targets"}) {
		t.Errorf("changed %v, want [new targets]", got)
	}
}
