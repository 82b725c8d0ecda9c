package pipeline

import (
	"path/filepath"
	"testing"
)

func TestCacheRootPrecedence(t *testing.T) {
	dag := &DAG{Cache: "/from/spec"}
	t.Setenv(CacheEnv, "/from/env")
	if got := CacheRoot("/from/flag", dag); got != "/from/flag" {
		t.Errorf("flag: %s", got)
	}
	if got := CacheRoot("", dag); got != "/from/env" {
		t.Errorf("environment: %s", got)
	}
	t.Setenv(CacheEnv, "")
	if got := CacheRoot("", dag); got != "/from/spec" {
		t.Errorf("spec: %s", got)
	}
	if got := CacheRoot("", nil); filepath.Base(got) != "pipeline" && filepath.Base(got) != "pipeline-cache" {
		t.Errorf("default: %s", got)
	}
}
