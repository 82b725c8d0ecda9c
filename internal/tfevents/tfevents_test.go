package tfevents_test

import (
	"bytes"
	"encoding/binary"
	"math"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"gemmaft/internal/tfevents"
	"gemmaft/internal/tfevents/tfeventstest"
)

func TestWriterReadBack(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "tb")
	start := time.Unix(1_700_000_000, 250_000_000)
	w, err := tfevents.Create(dir, start)
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(filepath.Base(w.Path()), "events.out.tfevents.1700000000.") {
		t.Errorf("file name %s: TensorBoard looks for events.out.tfevents.<seconds>.…", filepath.Base(w.Path()))
	}
	md := "| setting | value |\n|---|---|\n| lr | 0.0002 |\n| name | ü ğ ş <b> |"
	if err := w.Add(0, start, tfevents.Text("settings", md)); err != nil {
		t.Fatal(err)
	}
	for step := int64(1); step <= 3; step++ {
		wall := start.Add(time.Duration(step) * time.Second)
		if err := w.Add(step, wall, tfevents.Scalar("train/loss", 10-float64(step)/4), tfevents.Scalar("train/learning_rate", 2e-4)); err != nil {
			t.Fatal(err)
		}
	}
	if err := w.Add(1<<40, start, tfevents.Scalar("eval/loss", math.Pi)); err != nil {
		t.Fatal(err)
	}
	if err := w.Add(-3, start, tfevents.Scalar("odd/negative_step", -1)); err != nil {
		t.Fatal(err)
	}
	if err := w.Close(); err != nil {
		t.Fatal(err)
	}

	events, files, err := tfeventstest.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	if len(files) != 1 {
		t.Fatalf("files %v", files)
	}
	if len(events) != 7 {
		t.Fatalf("%d events, want 7 (version, text, 3 steps, eval, negative)", len(events))
	}
	if events[0].FileVersion != "brain.Event:2" || events[0].WallTime != 1_700_000_000.25 || len(events[0].Values) != 0 {
		t.Errorf("first event %+v, want the file version brain.Event:2 at the start time", events[0])
	}
	texts := tfeventstest.Texts(events)
	if got := texts["settings"]; len(got) != 1 || got[0] != md {
		t.Errorf("settings text %q, want %q", got, md)
	}
	tv := events[1].Values[0]
	if tv.DataClass != "DATA_CLASS_TENSOR" || len(tv.Shape) != 0 || !tv.HasTensor {
		t.Errorf("text value %+v: want a scalar DT_STRING tensor of data class TENSOR", tv)
	}
	sc := tfeventstest.Scalars(events)
	loss := sc["train/loss"]
	if len(loss) != 3 {
		t.Fatalf("train/loss %v", loss)
	}
	for i, p := range loss {
		want := float32(10 - float64(i+1)/4)
		if p.Step != int64(i+1) || p.Value != want || p.WallTime != 1_700_000_000.25+float64(i+1) {
			t.Errorf("train/loss[%d] = %+v, want step %d value %v", i, p, i+1, want)
		}
	}
	if lr := sc["train/learning_rate"]; len(lr) != 3 || lr[2].Value != float32(2e-4) {
		t.Errorf("train/learning_rate %v", lr)
	}
	if ev := sc["eval/loss"]; len(ev) != 1 || ev[0].Step != 1<<40 || ev[0].Value != float32(math.Pi) {
		t.Errorf("eval/loss %v", ev)
	}
	if neg := sc["odd/negative_step"]; len(neg) != 1 || neg[0].Step != -3 || neg[0].Value != -1 {
		t.Errorf("negative step %v", neg)
	}
}

// TestFramingByHand checks the first record byte for byte against the
// definitions: the TFRecord header and the Event{wall_time, file_version}.
func TestFramingByHand(t *testing.T) {
	dir := t.TempDir()
	w, err := tfevents.Create(dir, time.Unix(0, 0).Add(1500*time.Millisecond))
	if err != nil {
		t.Fatal(err)
	}
	if err := w.Close(); err != nil {
		t.Fatal(err)
	}
	data, err := os.ReadFile(w.Path())
	if err != nil {
		t.Fatal(err)
	}
	payload := []byte{0x09, 0, 0, 0, 0, 0, 0, 0xf8, 0x3f} // field 1, fixed64: 1.5
	payload = append(payload, 0x1a, 13)                   // field 3, 13 bytes
	payload = append(payload, "brain.Event:2"...)
	if len(data) != 12+len(payload)+4 {
		t.Fatalf("file has %d bytes, want %d", len(data), 12+len(payload)+4)
	}
	if n := binary.LittleEndian.Uint64(data); n != uint64(len(payload)) {
		t.Errorf("length %d, want %d", n, len(payload))
	}
	if !bytes.Equal(data[12:12+len(payload)], payload) {
		t.Errorf("payload % x\nwant    % x", data[12:12+len(payload)], payload)
	}
}

func TestReaderRejectsDamage(t *testing.T) {
	dir := t.TempDir()
	w, err := tfevents.Create(dir, time.Now())
	if err != nil {
		t.Fatal(err)
	}
	w.Add(1, time.Now(), tfevents.Scalar("a", 1))
	if err := w.Close(); err != nil {
		t.Fatal(err)
	}
	good, _ := os.ReadFile(w.Path())
	for name, mutate := range map[string]func([]byte) []byte{
		"flipped data byte":   func(b []byte) []byte { b[len(b)-6] ^= 1; return b },
		"flipped length byte": func(b []byte) []byte { b[0] ^= 1; return b },
		"torn record":         func(b []byte) []byte { return b[:len(b)-3] },
		"trailing bytes":      func(b []byte) []byte { return append(b, 0, 0, 0) },
	} {
		p := filepath.Join(t.TempDir(), "events.out.tfevents.damaged")
		os.WriteFile(p, mutate(append([]byte(nil), good...)), 0o644)
		if _, err := tfeventstest.ReadFile(p); err == nil {
			t.Errorf("%s: read without error", name)
		}
	}
}

func TestTwoWritersTwoFiles(t *testing.T) {
	dir := t.TempDir()
	now := time.Now()
	for i := 0; i < 2; i++ {
		w, err := tfevents.Create(dir, now)
		if err != nil {
			t.Fatal(err)
		}
		w.Add(int64(i), now, tfevents.Scalar("x", float64(i)))
		if err := w.Close(); err != nil {
			t.Fatal(err)
		}
	}
	events, files, err := tfeventstest.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	if len(files) != 2 || len(tfeventstest.Scalars(events)["x"]) != 2 {
		t.Errorf("files %v, events %d", files, len(events))
	}
}
