// Package gguf writes GGUF files, the model format of llama.cpp and
// Ollama, and converts a Gemma 3 checkpoint into one the way llama.cpp's
// own converter does (convert_hf_to_gguf.py): the same metadata keys,
// tensor names, norm weights stored as 1 + w, and the tokenizer as a
// SentencePiece-style vocabulary with token types and merge scores.
//
// A GGUF file is a little-endian header (magic, version 3, tensor and
// key-value counts), the key-value metadata, one info record per tensor
// (name, dimensions innermost first, ggml type, offset), padding to the
// alignment, then the tensors' data, each at an aligned offset. The writer
// knows every tensor's size before any data is written, so tensors are
// produced and written one at a time.
package gguf

import (
	"bufio"
	"encoding/binary"
	"fmt"
	"io"
	"math"
	"sort"

	"gemmaft/internal/atomicfile"
)

// Alignment of tensor data (general.alignment's default).
const Alignment = 32

// Type is a ggml tensor type.
type Type uint32

// The ggml types this package writes.
const (
	F32  Type = 0
	F16  Type = 1
	Q4_0 Type = 2
	Q5_0 Type = 6
	Q5_1 Type = 7
	Q8_0 Type = 8
	Q4_K Type = 12
	Q5_K Type = 13
	Q6_K Type = 14
	BF16 Type = 30
)

// typeInfo is a type's name and block: how many values a block holds and
// its bytes (ggml's type_traits).
var typeInfo = map[Type]struct {
	name          string
	values, bytes int
}{
	F32:  {"f32", 1, 4},
	F16:  {"f16", 1, 2},
	BF16: {"bf16", 1, 2},
	Q4_0: {"q4_0", 32, 2 + 16},
	Q5_0: {"q5_0", 32, 2 + 4 + 16},
	Q5_1: {"q5_1", 32, 2 + 2 + 4 + 16},
	Q8_0: {"q8_0", 32, 2 + 32},
	Q4_K: {"q4_K", superBlock, 2 + 2 + 12 + 128},
	Q5_K: {"q5_K", superBlock, 2 + 2 + 12 + 32 + 128},
	Q6_K: {"q6_K", superBlock, 128 + 64 + 16 + 2},
}

func (t Type) String() string {
	if i, ok := typeInfo[t]; ok {
		return i.name
	}
	return fmt.Sprintf("type%d", uint32(t))
}

// blockSize is how many elements one block of the type holds, and
// blockBytes its bytes.
func (t Type) blockSize() int { return max(1, typeInfo[t].values) }

func (t Type) blockBytes() int { return typeInfo[t].bytes }

// quantized says whether the type stores blocks of codes and scales.
func (t Type) quantized() bool { return t.blockSize() > 1 }

// Bytes is the size of n elements of the type (n a multiple of the block).
func (t Type) Bytes(n int64) int64 { return n / int64(t.blockSize()) * int64(t.blockBytes()) }

// Metadata value types.
const (
	typeUint8   = 0
	typeInt32   = 5
	typeUint32  = 4
	typeFloat32 = 6
	typeBool    = 7
	typeString  = 8
	typeArray   = 9
	typeUint64  = 10
)

// KV is one metadata entry; Value is a uint32, int32, uint64, float32,
// bool, string, []string, []float32 or []int32.
type KV struct {
	Key   string
	Value any
}

// Tensor is one tensor of a file: its GGUF name, its shape as the source
// checkpoint writes it (outermost first; GGUF stores it reversed), its
// type in the file, and the function that writes its data in that type.
type Tensor struct {
	Name  string
	Shape []int
	Type  Type
	Write func(w io.Writer) error
}

func (t Tensor) elements() int64 {
	n := int64(1)
	for _, d := range t.Shape {
		n *= int64(d)
	}
	return n
}

// WriteFile writes a GGUF file atomically: metadata (in key order, after
// general.architecture, which llama.cpp reads first) and tensors (in the
// order given), each tensor's data checked to be exactly its size.
func WriteFile(path string, kvs []KV, tensors []Tensor) error {
	kvs = append([]KV(nil), kvs...)
	sort.SliceStable(kvs, func(i, j int) bool {
		if (kvs[i].Key == "general.architecture") != (kvs[j].Key == "general.architecture") {
			return kvs[i].Key == "general.architecture"
		}
		return kvs[i].Key < kvs[j].Key
	})
	for _, t := range tensors {
		if bs := t.Type.blockSize(); len(t.Shape) == 0 || t.Shape[len(t.Shape)-1]%bs != 0 {
			return fmt.Errorf("gguf: tensor %s: rows of %v do not divide into %s blocks of %d", t.Name, t.Shape, t.Type, bs)
		}
	}
	return atomicfile.Write(path, func(f io.Writer) error {
		w := bufio.NewWriterSize(f, 1<<20)
		e := &encoder{w: w}
		e.u32(0x46554747) // "GGUF"
		e.u32(3)
		e.u64(uint64(len(tensors)))
		e.u64(uint64(len(kvs)))
		for _, kv := range kvs {
			e.str(kv.Key)
			if err := e.value(kv.Value); err != nil {
				return fmt.Errorf("gguf: %s: %w", kv.Key, err)
			}
		}
		var off int64
		offsets := make([]int64, len(tensors))
		for i, t := range tensors {
			e.str(t.Name)
			e.u32(uint32(len(t.Shape)))
			for d := len(t.Shape) - 1; d >= 0; d-- {
				e.u64(uint64(t.Shape[d]))
			}
			e.u32(uint32(t.Type))
			e.u64(uint64(off))
			offsets[i] = off
			off = align(off + t.Type.Bytes(t.elements()))
		}
		if e.err != nil {
			return e.err
		}
		e.pad()
		start := e.n
		for i, t := range tensors {
			e.padTo(start + offsets[i])
			before := e.n
			if e.err != nil {
				return e.err
			}
			if err := t.Write(e); err != nil {
				return fmt.Errorf("gguf: tensor %s: %w", t.Name, err)
			}
			if got, want := e.n-before, t.Type.Bytes(t.elements()); got != want {
				return fmt.Errorf("gguf: tensor %s: wrote %d bytes, its %v %s data takes %d", t.Name, got, t.Shape, t.Type, want)
			}
		}
		if e.err != nil {
			return e.err
		}
		return w.Flush()
	})
}

func align(n int64) int64 { return (n + Alignment - 1) / Alignment * Alignment }

// encoder writes little-endian values and counts bytes; it is also the
// io.Writer tensors write their data into.
type encoder struct {
	w   *bufio.Writer
	n   int64
	err error
}

func (e *encoder) Write(p []byte) (int, error) {
	if e.err != nil {
		return 0, e.err
	}
	n, err := e.w.Write(p)
	e.n += int64(n)
	e.err = err
	return n, err
}

func (e *encoder) u32(v uint32) {
	var b [4]byte
	binary.LittleEndian.PutUint32(b[:], v)
	e.Write(b[:])
}

func (e *encoder) u64(v uint64) {
	var b [8]byte
	binary.LittleEndian.PutUint64(b[:], v)
	e.Write(b[:])
}

func (e *encoder) str(s string) {
	e.u64(uint64(len(s)))
	e.Write([]byte(s))
}

func (e *encoder) pad() { e.padTo(align(e.n)) }

func (e *encoder) padTo(n int64) {
	if n > e.n {
		e.Write(make([]byte, n-e.n))
	}
}

func (e *encoder) value(v any) error {
	switch x := v.(type) {
	case uint32:
		e.u32(typeUint32)
		e.u32(x)
	case int32:
		e.u32(typeInt32)
		e.u32(uint32(x))
	case uint64:
		e.u32(typeUint64)
		e.u64(x)
	case float32:
		e.u32(typeFloat32)
		e.u32(math.Float32bits(x))
	case bool:
		e.u32(typeBool)
		if x {
			e.Write([]byte{1})
		} else {
			e.Write([]byte{0})
		}
	case string:
		e.u32(typeString)
		e.str(x)
	case []string:
		e.u32(typeArray)
		e.u32(typeString)
		e.u64(uint64(len(x)))
		for _, s := range x {
			e.str(s)
		}
	case []float32:
		e.u32(typeArray)
		e.u32(typeFloat32)
		e.u64(uint64(len(x)))
		for _, f := range x {
			e.u32(math.Float32bits(f))
		}
	case []int32:
		e.u32(typeArray)
		e.u32(typeInt32)
		e.u64(uint64(len(x)))
		for _, i := range x {
			e.u32(uint32(i))
		}
	default:
		return fmt.Errorf("unsupported value type %T", v)
	}
	return nil
}
