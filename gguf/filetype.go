package gguf

import (
	"errors"
	"fmt"
	"slices"
	"strings"

	"gemmaft/trainer"
)

// FileType is llama.cpp's llama_ftype, what users ask llama-quantize for
// (Q4_K_M): the file's general.file_type, and by llama.cpp's rules the
// type of each of its tensors, which in the k-quant mixes differs from
// tensor to tensor.
type FileType uint32

// The file types this package writes.
const (
	AllF32       FileType = 0
	MostlyF16    FileType = 1
	MostlyQ4_0   FileType = 2
	MostlyQ8_0   FileType = 7
	MostlyQ5_0   FileType = 8
	MostlyQ5_1   FileType = 9
	MostlyQ4_K_S FileType = 14
	MostlyQ4_K_M FileType = 15
	MostlyQ5_K_S FileType = 16
	MostlyQ5_K_M FileType = 17
	MostlyQ6_K   FileType = 18
	MostlyBF16   FileType = 32
)

// fileTypes lists them with their names (as in a file's name, in lower
// case) and the type most of their tensors take.
var fileTypes = []struct {
	ft   FileType
	name string
	base Type
}{
	{MostlyQ8_0, "q8_0", Q8_0},
	{MostlyQ6_K, "q6_k", Q6_K},
	{MostlyQ5_K_M, "q5_k_m", Q5_K},
	{MostlyQ5_K_S, "q5_k_s", Q5_K},
	{MostlyQ4_K_M, "q4_k_m", Q4_K},
	{MostlyQ4_K_S, "q4_k_s", Q4_K},
	{MostlyQ5_1, "q5_1", Q5_1},
	{MostlyQ5_0, "q5_0", Q5_0},
	{MostlyQ4_0, "q4_0", Q4_0},
	{MostlyF16, "f16", F16},
	{MostlyBF16, "bf16", BF16},
	{AllF32, "f32", F32},
}

// FileTypeNames are the names ParseFileType reads, most precise first.
func FileTypeNames() []string {
	var out []string
	for _, f := range fileTypes {
		out = append(out, f.name)
	}
	return out
}

// ErrNotWritten: a file type llama.cpp knows that this package does not
// write.
var ErrNotWritten = errors.New("which are not written here")

// notWritten are llama-quantize's other types: the 1-, 2- and 3-bit
// ones, q4_1, the i-quants (most of which need an importance matrix), the
// ternary and the MoE types.
var notWritten = []string{"q1_0", "q2_0", "q4_1", "mxfp4_moe", "iq2_xxs", "iq2_xs", "iq2_s", "iq2_m", "iq1_s", "iq1_m",
	"tq1_0", "tq2_0", "q2_k", "q2_k_s", "iq3_xxs", "iq3_s", "iq3_m", "q3_k", "iq3_xs", "q3_k_s", "q3_k_m", "q3_k_l",
	"iq4_nl", "iq4_xs"}

// aliases are llama-quantize's other names for the mixes.
var aliases = map[string]FileType{"q4_k": MostlyQ4_K_M, "q5_k": MostlyQ5_K_M}

// ParseFileType reads a file type as users write it, in either case
// (llama.cpp's tools write Q4_K_M).
func ParseFileType(s string) (FileType, error) {
	l := strings.ToLower(s)
	for _, f := range fileTypes {
		if f.name == l {
			return f.ft, nil
		}
	}
	if ft, ok := aliases[l]; ok {
		return ft, nil
	}
	if slices.Contains(notWritten, l) {
		return 0, fmt.Errorf("gguf: %s is one of llama.cpp's types %w: write q8_0 (or f16), then llama.cpp's llama-quantize turns that file into %s",
			s, ErrNotWritten, s)
	}
	return 0, fmt.Errorf("gguf: unknown type %q (%s)", s, strings.Join(FileTypeNames(), ", "))
}

func (ft FileType) String() string {
	for _, f := range fileTypes {
		if f.ft == ft {
			return f.name
		}
	}
	return fmt.Sprintf("file type %d", uint32(ft))
}

func (ft FileType) base() Type {
	for _, f := range fileTypes {
		if f.ft == ft {
			return f.base
		}
	}
	return F32
}

// tensorType is the type llama.cpp's quantiser gives a Gemma 3 weight in a
// file of type ft (llama-quant.cpp, llama_tensor_get_type, for an
// architecture without experts): norms stay f32; the embedding, which
// Gemma 3 ties to the output head, takes the head's q6_K (q8_0 under
// q8_0, or where its rows do not fill a q6_K block); the *_k_m mixes give
// attn_v and ffn_down q6_K in the first and last eighth of the layers and
// every third between; q4_k_s gives the first four attn_v and the first
// eighth's ffn_down q5_K. A type whose blocks do not fit a row
// falls back to a 32-value one, as there. llama.cpp counts attn_v and
// ffn_down tensors in layer order, one a layer, so its counters are the
// layer index here.
func (ft FileType) tensorType(t trainer.WeightTensor, layers int) Type {
	typ := ft.base()
	if len(t.Shape) < 2 {
		return F32
	}
	if !typ.quantized() {
		return typ
	}
	cols := t.Shape[len(t.Shape)-1] // ggml's ne[0]: the length of a row
	moreBits := func(i int) bool { return i < layers/8 || i >= 7*layers/8 || (i-layers/8)%3 == 2 }
	mix := ft == MostlyQ4_K_M || ft == MostlyQ5_K_M
	switch t.Role {
	case trainer.RoleEmbed:
		if cols%typ.blockSize() != 0 {
			typ = Q8_0
		} else if typ != Q8_0 {
			typ = Q6_K
		}
	case string(trainer.VProj):
		if mix && moreBits(t.Layer) {
			typ = Q6_K
		} else if ft == MostlyQ4_K_S && t.Layer < 4 {
			typ = Q5_K
		}
	case string(trainer.DownProj):
		if mix && moreBits(t.Layer) {
			typ = Q6_K
		} else if ft == MostlyQ4_K_S && t.Layer < layers/8 {
			typ = Q5_K
		}
	}
	if cols%typ.blockSize() == 0 {
		return typ
	}
	switch typ {
	case Q4_K:
		typ = Q5_0
	case Q5_K:
		typ = Q5_1
	case Q6_K:
		typ = Q8_0
	}
	if cols%typ.blockSize() != 0 {
		return F16
	}
	return typ
}
