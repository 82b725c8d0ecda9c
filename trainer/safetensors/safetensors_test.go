package safetensors

import (
	"encoding/binary"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func encodeHeader(js string, data int) []byte {
	b := make([]byte, 8+len(js)+data)
	binary.LittleEndian.PutUint64(b, uint64(len(js)))
	copy(b[8:], js)
	return b
}

func TestRoundTrip(t *testing.T) {
	vals := []float32{1, -2.5, 3.140625, 0}
	raw, err := EncodeFloat32(BF16, vals)
	if err != nil {
		t.Fatal(err)
	}
	f32, _ := EncodeFloat32(F32, []float32{7, 8})
	path := filepath.Join(t.TempDir(), "m.safetensors")
	err = WriteFile(path, []Tensor{
		{Name: "b", DType: F32, Shape: []int{2}, Data: f32},
		{Name: "a", DType: BF16, Shape: []int{2, 2}, Data: raw},
	}, map[string]string{"format": "pt"})
	if err != nil {
		t.Fatal(err)
	}
	f, err := Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if f.Header.Metadata["format"] != "pt" {
		t.Errorf("metadata = %v", f.Header.Metadata)
	}
	if f.Header.DataStart%8 != 0 {
		t.Errorf("data section at %d is not 8-byte aligned", f.Header.DataStart)
	}
	info, got, err := f.Float32("a")
	if err != nil {
		t.Fatal(err)
	}
	if len(info.Shape) != 2 || info.Shape[0] != 2 || info.DType != BF16 {
		t.Errorf("info = %+v", info)
	}
	for i := range vals {
		if got[i] != vals[i] {
			t.Errorf("a[%d] = %v, want %v", i, got[i], vals[i])
		}
	}
	_, got, err = f.Float32("b")
	if err != nil || got[0] != 7 || got[1] != 8 {
		t.Errorf("b = %v, %v", got, err)
	}
	if _, _, err := f.Raw("missing"); err == nil {
		t.Error("reading a missing tensor succeeded")
	}
}

func TestBadHeaders(t *testing.T) {
	cases := map[string]struct {
		file []byte
		want string
	}{
		"empty":       {nil, "shorter"},
		"huge length": {func() []byte { b := make([]byte, 16); binary.LittleEndian.PutUint64(b, 1<<40); return b }(), "limit"},
		"truncated": {func() []byte {
			b := encodeHeader(`{"a":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}}`, 16)
			return b[:len(b)-20]
		}(), "past the end"},
		"offset past end": {encodeHeader(`{"a":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}}`, 8), "outside"},
		"size lies":       {encodeHeader(`{"a":{"dtype":"F32","shape":[3],"data_offsets":[0,16]}}`, 16), "needs 12 bytes"},
		"reversed":        {encodeHeader(`{"a":{"dtype":"F32","shape":[0],"data_offsets":[8,0]}}`, 16), "outside"},
		"unknown dtype":   {encodeHeader(`{"a":{"dtype":"F8_E9","shape":[4],"data_offsets":[0,4]}}`, 4), "unknown dtype"},
		"negative dim":    {encodeHeader(`{"a":{"dtype":"U8","shape":[-1],"data_offsets":[0,0]}}`, 4), "negative"},
		"overflow":        {encodeHeader(`{"a":{"dtype":"F64","shape":[4294967296,4294967296],"data_offsets":[0,0]}}`, 4), "overflows"},
		"overlap":         {encodeHeader(`{"a":{"dtype":"U8","shape":[4],"data_offsets":[0,4]},"b":{"dtype":"U8","shape":[4],"data_offsets":[2,6]}}`, 8), "overlap"},
		"not json":        {encodeHeader(`[1,2]`, 0), "JSON object"},
		"extra field":     {encodeHeader(`{"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1],"x":1}}`, 1), "unknown field"},
	}
	for name, c := range cases {
		t.Run(name, func(t *testing.T) {
			_, err := ParseHeader(c.file, int64(len(c.file)))
			if err == nil || !strings.Contains(err.Error(), c.want) {
				t.Fatalf("err = %v, want one containing %q", err, c.want)
			}
			path := filepath.Join(t.TempDir(), "x.safetensors")
			os.WriteFile(path, c.file, 0o644)
			if f, err := Open(path); err == nil {
				f.Close()
				t.Fatal("Open accepted a bad file")
			}
		})
	}
}

func FuzzParseHeader(f *testing.F) {
	f.Add(encodeHeader(`{"a":{"dtype":"F32","shape":[4],"data_offsets":[0,16]},"__metadata__":{"k":"v"}}`, 16))
	f.Add(encodeHeader(`{"a":{"dtype":"BF16","shape":[],"data_offsets":[0,2]}}`, 2))
	f.Add(encodeHeader(`{}`, 0))
	f.Fuzz(func(t *testing.T, b []byte) {
		h, err := ParseHeader(b, int64(len(b)))
		if err != nil {
			return
		}
		data := int64(len(b)) - h.DataStart
		for _, ti := range h.Tensors {
			if ti.Begin < 0 || ti.End > data || ti.End-ti.Begin != int64(ti.NumElements()*ti.DType.Size()) {
				t.Fatalf("accepted bad tensor %+v with %d data bytes", ti, data)
			}
			_ = b[h.DataStart+ti.Begin : h.DataStart+ti.End]
		}
	})
}
