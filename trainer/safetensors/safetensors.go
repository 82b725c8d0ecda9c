// Package safetensors reads and writes the safetensors format: an 8-byte
// little-endian header length, a JSON header naming each tensor's dtype,
// shape and byte range, then the raw little-endian tensor bytes.
//
// The header is untrusted input. ParseHeader checks every offset, size and
// shape against the file before any byte of tensor data is touched, so a
// truncated or lying file is an error, never an out-of-bounds read.
package safetensors

import (
	"bytes"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math"
	"os"
	"sort"

	"gemmaft/internal/atomicfile"
	"gemmaft/internal/half"
)

// DType names an element type as the safetensors header spells it.
type DType string

const (
	BF16 DType = "BF16"
	F16  DType = "F16"
	F32  DType = "F32"
	F64  DType = "F64"
	I8   DType = "I8"
	U8   DType = "U8"
	I16  DType = "I16"
	U16  DType = "U16"
	I32  DType = "I32"
	U32  DType = "U32"
	I64  DType = "I64"
	U64  DType = "U64"
	Bool DType = "BOOL"
)

// Size is the number of bytes of one element, or 0 for an unknown dtype.
func (d DType) Size() int {
	switch d {
	case I8, U8, Bool:
		return 1
	case BF16, F16, I16, U16:
		return 2
	case F32, I32, U32:
		return 4
	case F64, I64, U64:
		return 8
	}
	return 0
}

// MaxHeaderSize bounds the JSON header; real checkpoints stay far below it
// and a larger claim is a corrupt or hostile file.
const MaxHeaderSize = 100 << 20

// TensorInfo describes one tensor. Begin and End are byte offsets into the
// data section, which starts right after the header.
type TensorInfo struct {
	Name  string
	DType DType
	Shape []int
	Begin int64
	End   int64
}

// NumElements is the product of the shape (1 for a scalar).
func (t TensorInfo) NumElements() int {
	n := 1
	for _, d := range t.Shape {
		n *= d
	}
	return n
}

// Header is a parsed, validated safetensors header.
type Header struct {
	Tensors  []TensorInfo // sorted by Begin
	Metadata map[string]string
	// DataStart is the file offset of the data section (8 + header length).
	DataStart int64
	byName    map[string]int
}

// Lookup returns the tensor named name.
func (h *Header) Lookup(name string) (TensorInfo, bool) {
	i, ok := h.byName[name]
	if !ok {
		return TensorInfo{}, false
	}
	return h.Tensors[i], true
}

type rawEntry struct {
	DType       DType   `json:"dtype"`
	Shape       []int64 `json:"shape"`
	DataOffsets []int64 `json:"data_offsets"`
}

// ParseHeader validates and decodes a header. prefix holds at least the
// first 8 bytes and the whole JSON header; fileSize is the length of the
// whole file, against which every tensor's byte range is checked.
func ParseHeader(prefix []byte, fileSize int64) (*Header, error) {
	if len(prefix) < 8 || fileSize < 8 {
		return nil, errors.New("safetensors: file shorter than its 8-byte header length")
	}
	n := binary.LittleEndian.Uint64(prefix[:8])
	if n > MaxHeaderSize {
		return nil, fmt.Errorf("safetensors: header length %d exceeds the %d-byte limit", n, MaxHeaderSize)
	}
	if int64(n) > fileSize-8 {
		return nil, fmt.Errorf("safetensors: header length %d runs past the end of a %d-byte file (truncated?)", n, fileSize)
	}
	if uint64(len(prefix)-8) < n {
		return nil, fmt.Errorf("safetensors: header needs %d bytes, got %d", n, len(prefix)-8)
	}
	js := prefix[8 : 8+n]
	var raw map[string]json.RawMessage
	dec := json.NewDecoder(bytes.NewReader(js))
	if err := dec.Decode(&raw); err != nil {
		return nil, fmt.Errorf("safetensors: header is not a JSON object: %w", err)
	}
	h := &Header{DataStart: 8 + int64(n), byName: map[string]int{}}
	dataSize := fileSize - h.DataStart
	for name, msg := range raw {
		if name == "__metadata__" {
			if err := json.Unmarshal(msg, &h.Metadata); err != nil {
				return nil, fmt.Errorf("safetensors: __metadata__ must map strings to strings: %w", err)
			}
			continue
		}
		var e rawEntry
		d := json.NewDecoder(bytes.NewReader(msg))
		d.DisallowUnknownFields()
		if err := d.Decode(&e); err != nil {
			return nil, fmt.Errorf("safetensors: tensor %q: %w", name, err)
		}
		info, err := checkEntry(name, e, dataSize)
		if err != nil {
			return nil, err
		}
		h.Tensors = append(h.Tensors, info)
	}
	sort.Slice(h.Tensors, func(i, j int) bool {
		a, b := h.Tensors[i], h.Tensors[j]
		if a.Begin != b.Begin {
			return a.Begin < b.Begin
		}
		return a.Name < b.Name
	})
	for i, t := range h.Tensors {
		if i > 0 && t.Begin < h.Tensors[i-1].End {
			return nil, fmt.Errorf("safetensors: tensors %q and %q overlap", h.Tensors[i-1].Name, t.Name)
		}
		h.byName[t.Name] = i
	}
	return h, nil
}

func checkEntry(name string, e rawEntry, dataSize int64) (TensorInfo, error) {
	size := e.DType.Size()
	if size == 0 {
		return TensorInfo{}, fmt.Errorf("safetensors: tensor %q has unknown dtype %q", name, e.DType)
	}
	if len(e.DataOffsets) != 2 {
		return TensorInfo{}, fmt.Errorf("safetensors: tensor %q: data_offsets must hold 2 numbers, got %d", name, len(e.DataOffsets))
	}
	begin, end := e.DataOffsets[0], e.DataOffsets[1]
	if begin < 0 || end < begin || end > dataSize {
		return TensorInfo{}, fmt.Errorf("safetensors: tensor %q: data_offsets [%d, %d] lie outside the %d-byte data section", name, begin, end, dataSize)
	}
	elems := int64(1)
	shape := make([]int, len(e.Shape))
	for i, d := range e.Shape {
		if d < 0 {
			return TensorInfo{}, fmt.Errorf("safetensors: tensor %q has negative dimension %d", name, d)
		}
		if d > 0 && elems > math.MaxInt64/int64(size)/d {
			return TensorInfo{}, fmt.Errorf("safetensors: tensor %q: shape %v overflows", name, e.Shape)
		}
		elems *= d
		shape[i] = int(d)
	}
	if elems*int64(size) != end-begin {
		return TensorInfo{}, fmt.Errorf("safetensors: tensor %q: shape %v of %s needs %d bytes, data_offsets give %d", name, e.Shape, e.DType, elems*int64(size), end-begin)
	}
	return TensorInfo{Name: name, DType: e.DType, Shape: shape, Begin: begin, End: end}, nil
}

// File is an open safetensors file whose header has been validated.
type File struct {
	Path   string
	Header *Header
	f      *os.File
}

// Open reads and validates the header of the file at path.
func Open(path string) (*File, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	st, err := f.Stat()
	if err != nil {
		f.Close()
		return nil, err
	}
	var lenBuf [8]byte
	if _, err := io.ReadFull(f, lenBuf[:]); err != nil {
		f.Close()
		return nil, fmt.Errorf("%s: safetensors: cannot read header length: %w", path, err)
	}
	n := binary.LittleEndian.Uint64(lenBuf[:])
	if n > MaxHeaderSize || int64(n) > st.Size()-8 {
		f.Close()
		_, err := ParseHeader(lenBuf[:], st.Size())
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	prefix := make([]byte, 8+n)
	copy(prefix, lenBuf[:])
	if _, err := io.ReadFull(f, prefix[8:]); err != nil {
		f.Close()
		return nil, fmt.Errorf("%s: safetensors: cannot read header: %w", path, err)
	}
	h, err := ParseHeader(prefix, st.Size())
	if err != nil {
		f.Close()
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	return &File{Path: path, Header: h, f: f}, nil
}

// Close releases the file.
func (f *File) Close() error { return f.f.Close() }

// Raw returns the bytes of the named tensor.
func (f *File) Raw(name string) (TensorInfo, []byte, error) {
	t, ok := f.Header.Lookup(name)
	if !ok {
		return TensorInfo{}, nil, fmt.Errorf("%s: no tensor %q", f.Path, name)
	}
	buf := make([]byte, t.End-t.Begin)
	if _, err := f.f.ReadAt(buf, f.Header.DataStart+t.Begin); err != nil {
		return TensorInfo{}, nil, fmt.Errorf("%s: tensor %q: %w", f.Path, name, err)
	}
	return t, buf, nil
}

// Float32 reads the named floating-point tensor, converting BF16, F16, F32
// or F64 to float32.
func (f *File) Float32(name string) (TensorInfo, []float32, error) {
	t, raw, err := f.Raw(name)
	if err != nil {
		return t, nil, err
	}
	out, err := DecodeFloat32(t.DType, raw)
	if err != nil {
		return t, nil, fmt.Errorf("%s: tensor %q: %w", f.Path, name, err)
	}
	return t, out, nil
}

// DecodeFloat32 converts little-endian floating-point bytes to float32.
func DecodeFloat32(dt DType, raw []byte) ([]float32, error) {
	size := dt.Size()
	switch dt {
	case BF16, F16, F32, F64:
	default:
		return nil, fmt.Errorf("dtype %s is not floating point", dt)
	}
	if len(raw)%size != 0 {
		return nil, fmt.Errorf("%d bytes is not a whole number of %s elements", len(raw), dt)
	}
	out := make([]float32, len(raw)/size)
	for i := range out {
		switch dt {
		case BF16:
			out[i] = half.FromBF16(binary.LittleEndian.Uint16(raw[2*i:]))
		case F16:
			out[i] = half.FromF16(binary.LittleEndian.Uint16(raw[2*i:]))
		case F32:
			out[i] = math.Float32frombits(binary.LittleEndian.Uint32(raw[4*i:]))
		case F64:
			out[i] = float32(math.Float64frombits(binary.LittleEndian.Uint64(raw[8*i:])))
		}
	}
	return out, nil
}

// EncodeFloat32 converts float32 values to little-endian bytes of dtype dt,
// rounding to nearest even for BF16 and F16.
func EncodeFloat32(dt DType, v []float32) ([]byte, error) {
	size := dt.Size()
	out := make([]byte, len(v)*size)
	for i, x := range v {
		switch dt {
		case BF16:
			binary.LittleEndian.PutUint16(out[2*i:], half.BF16(x))
		case F16:
			binary.LittleEndian.PutUint16(out[2*i:], half.F16(x))
		case F32:
			binary.LittleEndian.PutUint32(out[4*i:], math.Float32bits(x))
		case F64:
			binary.LittleEndian.PutUint64(out[8*i:], math.Float64bits(float64(x)))
		default:
			return nil, fmt.Errorf("dtype %s is not floating point", dt)
		}
	}
	return out, nil
}

// Tensor is one tensor to write.
type Tensor struct {
	Name  string
	DType DType
	Shape []int
	Data  []byte
}

// Encode serialises tensors (in name order, as Hugging Face's writer does)
// and metadata into safetensors bytes.
func Encode(tensors []Tensor, metadata map[string]string) ([]byte, error) {
	ts := append([]Tensor(nil), tensors...)
	sort.Slice(ts, func(i, j int) bool { return ts[i].Name < ts[j].Name })
	hdr := map[string]any{}
	if len(metadata) > 0 {
		hdr["__metadata__"] = metadata
	}
	var off int64
	for i, t := range ts {
		if t.Name == "__metadata__" || t.Name == "" {
			return nil, fmt.Errorf("safetensors: invalid tensor name %q", t.Name)
		}
		if i > 0 && ts[i-1].Name == t.Name {
			return nil, fmt.Errorf("safetensors: duplicate tensor %q", t.Name)
		}
		n := int64(t.DType.Size())
		if n == 0 {
			return nil, fmt.Errorf("safetensors: tensor %q has unknown dtype %q", t.Name, t.DType)
		}
		for _, d := range t.Shape {
			n *= int64(d)
		}
		if n != int64(len(t.Data)) {
			return nil, fmt.Errorf("safetensors: tensor %q: shape %v of %s needs %d bytes, have %d", t.Name, t.Shape, t.DType, n, len(t.Data))
		}
		shape := t.Shape
		if shape == nil {
			shape = []int{}
		}
		hdr[t.Name] = map[string]any{"dtype": t.DType, "shape": shape, "data_offsets": []int64{off, off + n}}
		off += n
	}
	js, err := json.Marshal(hdr)
	if err != nil {
		return nil, err
	}
	// Pad the header with spaces to a multiple of 8 so the data section is
	// aligned, as the reference writer does.
	for len(js)%8 != 0 {
		js = append(js, ' ')
	}
	out := make([]byte, 8, 8+len(js)+int(off))
	binary.LittleEndian.PutUint64(out, uint64(len(js)))
	out = append(out, js...)
	for _, t := range ts {
		out = append(out, t.Data...)
	}
	return out, nil
}

// WriteFile writes tensors to path atomically: a temporary file in the same
// directory is written, synced and renamed over path.
func WriteFile(path string, tensors []Tensor, metadata map[string]string) error {
	b, err := Encode(tensors, metadata)
	if err != nil {
		return err
	}
	return atomicfile.WriteFile(path, b)
}
