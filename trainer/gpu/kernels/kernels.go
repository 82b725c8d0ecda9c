// Package kernels holds the Gemma 3 training kernels of the GPU backend as
// CUDA C++ sources embedded in the binary, and one Go function per kernel
// that checks its arguments' shapes and launches it. Each kernel mirrors
// one operation of the CPU reference (package trainer) and is tested
// against it.
//
// Every file is compiled twice over, once per activation type: bfloat16
// (training) and float32 (-DACT_F32, the test mode in which the GPU's
// results are compared with the reference closely). Attention is compiled
// per head dimension (-DHEAD_DIM). The tables of the NF4 and 8-bit codes
// are generated from package trainer at load time (tables.cuh), so the
// host and the device decode the same numbers.
package kernels

import (
	"embed"
	"fmt"
	"os"
	"sort"
	"strconv"
	"strings"

	"gemmaft/cuda"
	"gemmaft/trainer"
)

//go:embed *.cu *.cuh
var files embed.FS

// Precision is the type activations and GEMM operands are stored in.
type Precision int

const (
	BF16 Precision = iota // training
	F32                   // the test mode
)

func (p Precision) String() string {
	if p == F32 {
		return "fp32"
	}
	return "bf16"
}

// Size is the bytes of one activation.
func (p Precision) Size() int64 {
	if p == F32 {
		return 4
	}
	return 2
}

// GEMMType is the cuda GEMM operand type of activations.
func (p Precision) GEMMType() cuda.DType {
	if p == F32 {
		return cuda.F32
	}
	return cuda.BF16
}

// ParsePrecision reads "bf16" (or "") and "fp32".
func ParsePrecision(s string) (Precision, error) {
	switch s {
	case "", "bf16":
		return BF16, nil
	case "fp32":
		return F32, nil
	}
	return 0, fmt.Errorf("precision %q: use bf16 or fp32", s)
}

// moduleFiles are the kernel files, each compiled as one module.
var moduleFiles = []string{"norm.cu", "rope.cu", "attention.cu", "mlp.cu", "embed.cu", "loss.cu", "lora.cu", "nf4.cu", "decode.cu", "token.cu", "optim.cu"}

// CheckHeadDim reports whether the attention kernels support a head
// dimension: a power of two from 2 to 256.
func CheckHeadDim(d int) error {
	if d < 2 || d > 256 || d&(d-1) != 0 {
		return fmt.Errorf("head_dim %d: the GPU attention kernels take a power of two up to 256", d)
	}
	return nil
}

// Sources returns the programs for a precision and head dimension, ready
// to compile.
func Sources(p Precision, headDim int) ([]cuda.Source, error) {
	if err := CheckHeadDim(headDim); err != nil {
		return nil, err
	}
	headers := map[string]string{"tables.cuh": TablesHeader()}
	for _, h := range []string{"gemma.cuh", "nf4.cuh", "random.cuh"} {
		b, err := files.ReadFile(h)
		if err != nil {
			return nil, err
		}
		headers[h] = string(b)
	}
	var out []cuda.Source
	for _, name := range moduleFiles {
		b, err := files.ReadFile(name)
		if err != nil {
			return nil, err
		}
		var opts []string
		if p == F32 {
			opts = append(opts, "-DACT_F32")
		}
		switch name {
		case "attention.cu", "token.cu":
			opts = append(opts, "-DHEAD_DIM="+strconv.Itoa(headDim))
		case "nf4.cu":
			opts = append(opts, "-DNF4_MIN_BLOCKS="+strconv.Itoa(nf4BlocksPerSM))
		case "optim.cu":
			// Bit-identical optimizer steps with the host's float32 code.
			opts = append(opts, "--fmad=false")
		}
		out = append(out, cuda.WithCommonHeader(cuda.Source{Name: name, Code: string(b), Headers: headers, Options: opts}))
	}
	return out, nil
}

// TablesHeader is tables.cuh, which the kernels #include: the NF4 code,
// its decision midpoints and the two 8-bit dynamic codes as constant
// arrays of exact float literals. Exported for standalone CUDA programs
// built with nvcc against these kernels (scripts/cudaheaders).
func TablesHeader() string {
	var b strings.Builder
	b.WriteString("// Generated from package trainer's tables; do not edit.\n#pragma once\n")
	array := func(name string, vals []float32) {
		fmt.Fprintf(&b, "__device__ __constant__ float %s[%d] = {", name, len(vals))
		for i, v := range vals {
			if i > 0 {
				b.WriteString(", ")
			}
			// Hexadecimal floats are exact: the device sees the host's bits.
			b.WriteString(strconv.FormatFloat(float64(v), 'x', -1, 32) + "f")
		}
		b.WriteString("};\n")
	}
	code := trainer.NF4Code()
	mid := make([]float32, 15)
	for i := range mid {
		mid[i] = float32((float64(code[i]) + float64(code[i+1])) / 2)
	}
	dyn, udyn := trainer.DynamicCode(true), trainer.DynamicCode(false)
	array("NF4_CODE", code[:])
	array("NF4_MID", mid)
	array("DYN_CODE", dyn[:])
	array("UDYN_CODE", udyn[:])
	return b.String()
}

// Kernels is the loaded kernel set of one context, precision and head
// dimension.
type Kernels struct {
	Prec    Precision
	HeadDim int
	// Timer, when set, wraps every launch (for profiles by kernel).
	Timer Timer
	fns   map[string]*cuda.Function
	sms   int // the device's multiprocessors
	// tokenShared is the shared memory decode_token and
	// decode_token_lora may use so far.
	tokenShared map[string]int
}

// Timer times a launch: it runs f, the launch of kernel name, between
// whatever marks it records on the stream.
type Timer interface {
	Time(c *cuda.Ctx, name string, f func() error) error
}

// Load compiles (or finds in the kernel cache) and loads every module.
func Load(c *cuda.Ctx, p Precision, headDim int) (*Kernels, error) {
	srcs, err := Sources(p, headDim)
	if err != nil {
		return nil, err
	}
	k := &Kernels{Prec: p, HeadDim: headDim, fns: map[string]*cuda.Function{}, sms: c.Device().Info.SMs, tokenShared: map[string]int{}}
	for _, src := range srcs {
		m, err := c.Compile(src)
		if err != nil {
			return nil, fmt.Errorf("compiling %s: %w", src.Name, err)
		}
		for _, name := range kernelNames(src.Code) {
			f, err := m.Function(name)
			if err != nil {
				return nil, err
			}
			k.fns[name] = f
		}
	}
	// Attention tiles exceed the default 48 KiB of shared memory.
	for name, bytes := range attentionShared(headDim) {
		if err := k.fns[name].SetMaxDynamicSharedMemory(bytes); err != nil {
			return nil, fmt.Errorf("%s: %d bytes of shared memory: %w", name, bytes, err)
		}
	}
	return k, nil
}

// kernelNames lists the extern "C" __global__ functions of a source.
func kernelNames(code string) []string {
	var out []string
	for _, line := range strings.Split(code, "\n") {
		i := strings.Index(line, "__global__ void ")
		if !strings.HasPrefix(line, `extern "C"`) || i < 0 {
			continue
		}
		rest := line[i+len("__global__ void "):]
		if strings.HasPrefix(rest, "__launch_bounds__(") {
			rest = rest[strings.Index(rest, ") ")+2:]
		}
		if j := strings.Index(rest, "("); j > 0 {
			out = append(out, rest[:j])
		}
	}
	sort.Strings(out)
	return out
}

// attentionShared is the dynamic shared memory of each attention kernel,
// as attention.cu lays it out.
func attentionShared(headDim int) map[string]int {
	stride := headDim + 1
	return map[string]int{
		"attn_fwd":      4 * ((16+32+32)*stride + 16*33 + 3*16),
		"attn_fwd_mma":  2 * (64 + 32 + 32) * (headDim + 8),
		"attn_bwd_dkdv": 4 * (4*16*stride + 2*16*17 + 2*16),
		"attn_bwd_dq":   4 * (4*16*stride + 16*17 + 2*16),
		// Tiles of attention.cu's DQ_BK keys and KV_BQ queries.
		"attn_bwd_dq_mma":   2 * (2*64 + 2*mmaBackwardTile(headDim)) * (headDim + 8),
		"attn_bwd_dkdv_mma": 2*(2*64+2*mmaBackwardTile(headDim))*(headDim+8) + 3*4*mmaBackwardTile(headDim),
	}
}

// mmaBackwardTile is DQ_BK and KV_BQ of attention.cu: 16 at head
// dimension 256, to stay within sm_86's and sm_89's shared memory.
func mmaBackwardTile(headDim int) int {
	if headDim > 128 {
		return 16
	}
	return 32
}

// grid covers n items with blocks of 256 threads, capped: the kernels
// stride over the rest.
func (k *Kernels) grid(n int64) cuda.LaunchConfig {
	blocks := (n + 255) / 256
	blocks = max(1, min(blocks, 16*int64(k.sms)))
	return cuda.LaunchConfig{Grid: cuda.Dim3{X: int(blocks)}, Block: cuda.Dim3{X: 256}}
}

// rowsOf launches one block per row.
func rowsOf(rows, threads int) cuda.LaunchConfig {
	return cuda.LaunchConfig{Grid: cuda.Dim3{X: rows}, Block: cuda.Dim3{X: threads}}
}

// warpRows launches one warp per row, four warps a block.
func warpRows(rows int) cuda.LaunchConfig {
	return cuda.LaunchConfig{Grid: cuda.Dim3{X: (rows + 3) / 4}, Block: cuda.Dim3{X: 128}}
}

func (k *Kernels) launch(c *cuda.Ctx, name string, cfg cuda.LaunchConfig, args ...any) error {
	f, ok := k.fns[name]
	if !ok {
		return fmt.Errorf("kernels: no kernel %s", name)
	}
	if k.Timer != nil {
		return k.Timer.Time(c, name, func() error { return c.Launch(f, cfg, args...) })
	}
	return c.Launch(f, cfg, args...)
}

// vec is the number of activations in 16 bytes (VEC in gemma.cuh).
func (k *Kernels) vec() int { return 16 / int(k.Prec.Size()) }

// vectors reports whether n elements at each of ptrs (0 for none) can take
// a kernel's 16-byte path: whole vectors, every pointer 16-byte aligned.
func (k *Kernels) vectors(n int64, ptrs ...cuda.DevicePtr) bool {
	if n%int64(k.vec()) != 0 {
		return false
	}
	for _, p := range ptrs {
		if p%16 != 0 {
			return false
		}
	}
	return true
}

// vecForm is kernel name's form for n activations at ptrs and the count
// it takes: name_vec and n in 16-byte vectors where they are whole
// vectors, else name and n.
func (k *Kernels) vecForm(name string, n int64, ptrs ...cuda.DevicePtr) (string, int64) {
	if k.vectors(n, ptrs...) {
		return name + "_vec", n / int64(k.vec())
	}
	return name, n
}

// normThreads is the block size of the row kernels: enough threads for
// wide rows, no more than a narrow row can use.
func normThreads(cols int) int {
	return max(32, min(1024, (cols+31)/32*32))
}

// RMSNorm computes out = norm(x)·(1 + w), or res + that when res is not 0,
// over rows×cols activations; rstd receives each row's reciprocal RMS.
func (k *Kernels) RMSNorm(c *cuda.Ctx, x, w, res, out, rstd cuda.DevicePtr, rows, cols int, eps float64) error {
	name, g := k.vecForm("rms_norm_fwd", int64(cols), x, w, res, out)
	return k.launch(c, name, rowsOf(rows, normThreads(int(g))), x, w, res, out, rstd, int32(rows), int32(g), float32(eps))
}

// RMSNormPair computes mid = res + norm(x)·(1 + w1) and then
// out = norm(mid)·(1 + w2), with their reciprocal RMS in rstd1 and rstd2:
// RMSNorm twice, as one launch where the rows allow it.
func (k *Kernels) RMSNormPair(c *cuda.Ctx, x, w1, res, mid, rstd1, w2, out, rstd2 cuda.DevicePtr, rows, cols int, eps float64) error {
	if !k.vectors(int64(cols), x, w1, res, mid, w2, out) {
		if err := k.RMSNorm(c, x, w1, res, mid, rstd1, rows, cols, eps); err != nil {
			return err
		}
		return k.RMSNorm(c, mid, w2, 0, out, rstd2, rows, cols, eps)
	}
	vecs := cols / k.vec()
	return k.launch(c, "rms_norm_pair_vec", rowsOf(rows, normThreads(vecs)), x, w1, res, mid, rstd1, w2, out, rstd2,
		int32(rows), int32(vecs), float32(eps))
}

// RMSNormBackwardAct writes the input gradient of RMSNorm as activations.
func (k *Kernels) RMSNormBackwardAct(c *cuda.Ctx, dy, x, w, rstd, dx cuda.DevicePtr, rows, cols int) error {
	name, g := k.vecForm("rms_norm_bwd_act", int64(cols), dy, x, w, dx)
	return k.launch(c, name, rowsOf(rows, normThreads(int(g))), dy, x, w, rstd, dx, int32(rows), int32(g))
}

// RMSNormBackwardF32 writes res + the input gradient of RMSNorm in float32
// (res may be 0, or dx itself).
func (k *Kernels) RMSNormBackwardF32(c *cuda.Ctx, dy, x, w, rstd, res, dx cuda.DevicePtr, rows, cols int) error {
	name, g := k.vecForm("rms_norm_bwd_f32", int64(cols), dy, x, w, res, dx)
	return k.launch(c, name, rowsOf(rows, normThreads(int(g))), dy, x, w, rstd, res, dx, int32(rows), int32(g))
}

// Heads is one side of QKNormRope: Heads rows of head_dim activations a
// token at X, their norm's weight W, the output Out and each row's
// reciprocal RMS in Rstd.
type Heads struct {
	X, W, Out, Rstd cuda.DevicePtr
	Heads           int
}

// QKNormRope normalises each head of q and of k (Gemma 3's q_norm and
// k_norm) and rotates it by RoPE at the tokens' positions (cos and sin
// tables of tokens × dim/2), both sides in one launch; a side of 0 heads
// is skipped.
func (k *Kernels) QKNormRope(c *cuda.Ctx, q, kk Heads, cos, sin cuda.DevicePtr, tokens, dim int, eps float64) error {
	qrows, krows := tokens*q.Heads, tokens*kk.Heads
	name := "qk_norm_rope_fwd"
	// The _vec form: a lane's four elements of each half in one load, every
	// row and table row starting 16 bytes apart.
	if dim%8 == 0 && dim <= 256 && k.vectors(0, q.X, q.W, q.Out, kk.X, kk.W, kk.Out, cos, sin) {
		name += "_vec"
	}
	return k.launch(c, name, warpRows(qrows+krows), q.X, q.W, q.Out, q.Rstd, int32(qrows), int32(max(q.Heads, 1)),
		kk.X, kk.W, kk.Out, kk.Rstd, int32(krows), int32(max(kk.Heads, 1)), cos, sin, int32(dim), float32(eps))
}

// HeadsGrad is one side of QKNormRopeBackward: DY, the float32 gradient of
// QKNormRope's output [tokens × Heads × head_dim]; the side's input X, norm
// weight W and Rstd as QKNormRope had them; and DX, where the gradient of
// X goes as activations, a token's row LD activations after the one before
// (0: Heads·head_dim, packed), so that q's, k's and v's gradients can lie
// side by side in one matrix.
type HeadsGrad struct {
	DY, X, W, Rstd, DX cuda.DevicePtr
	Heads, LD          int
}

// ld is the side's row stride in DX.
func (h HeadsGrad) ld(dim int) int {
	if h.LD == 0 {
		return h.Heads * dim
	}
	return h.LD
}

// QKNormRopeBackward turns the gradients of QKNormRope's outputs into the
// gradients of its inputs, both sides in one launch (a side of 0 heads is
// skipped).
func (k *Kernels) QKNormRopeBackward(c *cuda.Ctx, q, kk HeadsGrad, cos, sin cuda.DevicePtr, tokens, dim int) error {
	qrows, krows := tokens*q.Heads, tokens*kk.Heads
	qld, kld := q.ld(dim), kk.ld(dim)
	name := "qk_norm_rope_bwd"
	// The _vec form: a lane's four elements of each half in one load and
	// one store, every row and table row starting 16 bytes apart.
	if dim%8 == 0 && dim <= 256 && qld%8 == 0 && kld%8 == 0 && k.vectors(0, q.DY, q.X, q.W, q.DX, kk.DY, kk.X, kk.W, kk.DX, cos, sin) {
		name += "_vec"
	}
	return k.launch(c, name, warpRows(qrows+krows), q.DY, q.X, q.W, q.Rstd, q.DX, int32(qrows), int32(max(q.Heads, 1)), int32(qld),
		kk.DY, kk.X, kk.W, kk.Rstd, kk.DX, int32(krows), int32(max(kk.Heads, 1)), int32(kld), cos, sin, int32(dim))
}

// Attention computes out [tokens × heads × dim] and lse [tokens × heads]
// from q, k and v, query i seeing keys lo[i] .. i.
func (k *Kernels) Attention(c *cuda.Ctx, q, kk, v, lo, out, lse cuda.DevicePtr, tokens, heads, kvHeads int, scale float64) error {
	if k.TensorCoreAttention(q, kk, v, out) {
		cfg := cuda.LaunchConfig{Grid: cuda.Dim3{X: (tokens + 63) / 64, Y: heads}, Block: cuda.Dim3{X: 128},
			SharedMem: attentionShared(k.HeadDim)["attn_fwd_mma"]}
		return k.launch(c, "attn_fwd_mma", cfg, q, kk, v, lo, out, lse, int32(tokens), int32(heads), int32(kvHeads), float32(scale))
	}
	cfg := cuda.LaunchConfig{Grid: cuda.Dim3{X: (tokens + 15) / 16, Y: heads}, Block: cuda.Dim3{X: 256},
		SharedMem: attentionShared(k.HeadDim)["attn_fwd"]}
	return k.launch(c, "attn_fwd", cfg, q, kk, v, lo, out, lse, int32(tokens), int32(heads), int32(kvHeads), float32(scale))
}

// TensorCoreAttention reports whether Attention and AttentionBackward run
// on tensor cores for these buffers: bf16 activations, a head dimension
// that is a multiple of 16 and rows the kernels may read 16 bytes at a
// time. PIPELINE_ATTENTION=cuda-cores keeps the CUDA-core kernels, to
// compare the two or to rule the tensor-core ones out when a run
// misbehaves.
func (k *Kernels) TensorCoreAttention(bufs ...cuda.DevicePtr) bool {
	if k.Prec != BF16 || k.HeadDim%16 != 0 || os.Getenv("PIPELINE_ATTENTION") == "cuda-cores" {
		return false
	}
	for _, b := range bufs {
		if b%16 != 0 {
			return false
		}
	}
	return true
}

// AttentionBackward writes dq, dk and dv (float32) from dout (float32), the
// forward's lse, lo and hi (the last query that sees each key). delta is
// scratch of tokens × heads floats.
func (k *Kernels) AttentionBackward(c *cuda.Ctx, q, kk, v, dout, lse, lo, hi, delta, dq, dk, dv cuda.DevicePtr,
	tokens, heads, kvHeads int, scale float64) error {
	sh := attentionShared(k.HeadDim)
	if k.TensorCoreAttention(q, kk, v, dout) {
		rows := cuda.LaunchConfig{Grid: cuda.Dim3{X: (tokens + 63) / 64, Y: heads}, Block: cuda.Dim3{X: 128}, SharedMem: sh["attn_bwd_dq_mma"]}
		keys := cuda.LaunchConfig{Grid: cuda.Dim3{X: (tokens + 63) / 64, Y: kvHeads}, Block: cuda.Dim3{X: 128}, SharedMem: sh["attn_bwd_dkdv_mma"]}
		queries := func(wantDelta int32) error {
			return k.launch(c, "attn_bwd_dq_mma", rows, q, kk, v, dout, lse, delta, lo, dq,
				int32(tokens), int32(heads), int32(kvHeads), float32(scale), wantDelta)
		}
		// delta, then dV and dK, then dQ.
		if err := queries(1); err != nil {
			return err
		}
		for _, wantDK := range []int32{0, 1} {
			if err := k.launch(c, "attn_bwd_dkdv_mma", keys, q, kk, v, dout, lse, delta, lo, hi, dk, dv,
				int32(tokens), int32(heads), int32(kvHeads), float32(scale), wantDK); err != nil {
				return err
			}
		}
		return queries(0)
	}
	rows := cuda.LaunchConfig{Grid: cuda.Dim3{X: (tokens + 15) / 16, Y: heads}, Block: cuda.Dim3{X: 256}, SharedMem: sh["attn_bwd_dq"]}
	if err := k.launch(c, "attn_bwd_dq", rows, q, kk, v, dout, lse, delta, lo, dq,
		int32(tokens), int32(heads), int32(kvHeads), float32(scale), int32(1)); err != nil {
		return err
	}
	cfg := cuda.LaunchConfig{Grid: cuda.Dim3{X: (tokens + 15) / 16, Y: kvHeads}, Block: cuda.Dim3{X: 256}, SharedMem: sh["attn_bwd_dkdv"]}
	if err := k.launch(c, "attn_bwd_dkdv", cfg, q, kk, v, dout, lse, delta, lo, hi, dk, dv,
		int32(tokens), int32(heads), int32(kvHeads), float32(scale)); err != nil {
		return err
	}
	return k.launch(c, "attn_bwd_dq", rows, q, kk, v, dout, lse, delta, lo, dq,
		int32(tokens), int32(heads), int32(kvHeads), float32(scale), int32(0))
}

// KVStore copies a step's keys kr and values v [tokens × kvHeads × head_dim]
// into the decoding caches kc and vc [sequences × cacheLen × kvHeads ×
// head_dim]: token t is sequence seq[t]'s position pos[t], kept in row
// pos % cacheLen, unless pos[t] < from[t].
func (k *Kernels) KVStore(c *cuda.Ctx, kr, v, seq, pos, from, kc, vc cuda.DevicePtr, tokens, kvHeads, cacheLen int) error {
	n := int64(tokens) * int64(kvHeads) * int64(k.HeadDim)
	return k.launch(c, "kv_store", k.grid(n), kr, v, seq, pos, from, kc, vc, int32(tokens), int32(kvHeads), int32(cacheLen))
}

// decodeChunk is attention.cu's DEC_CHUNK: the keys one block of
// attn_cached takes.
const decodeChunk = 32

// cachedSplits is the number of attn_cached blocks per (token, head): as
// many as the most keys a token may attend to take.
func cachedSplits(cacheLen, window int) int {
	keys := cacheLen
	if window > 0 {
		keys = min(keys, window)
	}
	return (keys + decodeChunk - 1) / decodeChunk
}

// CachedAttentionBytes is the workspace AttentionCached needs for tokens
// tokens: a counter per (token, head), then a float32 record per (token,
// head, split).
func (k *Kernels) CachedAttentionBytes(tokens, heads, cacheLen, window int) int64 {
	return 4 * int64(tokens) * int64(heads) * (1 + int64(cachedSplits(cacheLen, window))*int64(k.HeadDim+2))
}

// AttentionCached computes out [tokens × heads × head_dim]: each token's
// query heads against its sequence's cached keys and values, positions up
// to its own (within window on sliding layers, 0 meaning all), through the
// workspace part (CachedAttentionBytes for at least tokens). part's
// counters, its first 4·tokens·heads bytes, must be zero before its first
// use (clear it once); each launch leaves them zero.
func (k *Kernels) AttentionCached(c *cuda.Ctx, q, kc, vc, seq, pos, part, out cuda.DevicePtr, tokens, heads, kvHeads, cacheLen, window int, scale float64) error {
	cfg := cuda.LaunchConfig{Grid: cuda.Dim3{X: tokens, Y: heads, Z: cachedSplits(cacheLen, window)}, Block: cuda.Dim3{X: 128}}
	return k.launch(c, "attn_cached", cfg, q, kc, vc, seq, pos, part, out, int32(heads), int32(kvHeads), int32(cacheLen), int32(window), float32(scale))
}

// GeGLU computes out = gelu_tanh(gate)·up over n activations.
func (k *Kernels) GeGLU(c *cuda.Ctx, gate, up, out cuda.DevicePtr, n int64) error {
	name, g := k.vecForm("geglu_fwd", n, gate, up, out)
	return k.launch(c, name, k.grid(g), gate, up, out, g)
}

// GeGLUBackward writes dgate and dup (which may be gate and up) from the
// float32 gradient dout.
func (k *Kernels) GeGLUBackward(c *cuda.Ctx, dout, gate, up, dgate, dup cuda.DevicePtr, n int64) error {
	name, g := k.vecForm("geglu_bwd", n, dout, gate, up, dgate, dup)
	return k.launch(c, name, k.grid(g), dout, gate, up, dgate, dup, g)
}

// Embed gathers rows of table for ids and multiplies them by scale.
func (k *Kernels) Embed(c *cuda.Ctx, ids, table cuda.DevicePtr, scale float32, out cuda.DevicePtr, tokens, dim int) error {
	return k.launch(c, "embed_fwd", k.grid(int64(tokens)*int64(dim)), ids, table, scale, out, int32(tokens), int32(dim))
}

// GatherRows copies rows idx[0..n) of src into dst.
func (k *Kernels) GatherRows(c *cuda.Ctx, src, idx, dst cuda.DevicePtr, n, dim int) error {
	return k.launch(c, "gather_rows", k.grid(int64(n)*int64(dim)), src, idx, dst, int32(n), int32(dim))
}

// ScatterRows copies the float32 rows of src to rows idx of dst.
func (k *Kernels) ScatterRows(c *cuda.Ctx, src, idx, dst cuda.DevicePtr, n, dim int) error {
	return k.launch(c, "scatter_rows", k.grid(int64(n)*int64(dim)), src, idx, dst, int32(n), int32(dim))
}

// CrossEntropy writes each row's loss (float64) and, when grad is not 0,
// (softmax − onehot)/normalizer as activations.
func (k *Kernels) CrossEntropy(c *cuda.Ctx, logits, targets cuda.DevicePtr, rows, vocab int, normalizer float64, loss, grad cuda.DevicePtr) error {
	return k.launch(c, "cross_entropy", rowsOf(rows, 1024), logits, targets, int32(vocab), float32(normalizer), loss, grad)
}

// ArgmaxRows writes to best the index of each row's largest value (the
// lowest among equals; NaN never wins), greedy decoding's choice.
func (k *Kernels) ArgmaxRows(c *cuda.Ctx, logits cuda.DevicePtr, rows, vocab int, best cuda.DevicePtr) error {
	return k.launch(c, "argmax_rows", rowsOf(rows, 1024), logits, int32(vocab), best)
}

// TopChunks is the most chunks top_chunk_max cuts a row into (TOP_CHUNKS
// in loss.cu), so the largest k TopCandidates takes.
const TopChunks = 1024

// TopChunking is how TopCandidates cuts a row of vocab logits: chunks of
// length values (a multiple of 32), chunks of them. k may be at most chunks.
func TopChunking(vocab int) (length, chunks int) {
	length = max(32, ((vocab+TopChunks-1)/TopChunks+31)/32*32)
	return length, (vocab + length - 1) / length
}

// TopRecordWords is the size in 4-byte words of a row's record from
// TopCandidates with room for capacity candidates.
func TopRecordWords(capacity int) int { return 2 + 2*capacity }

// TopCandidates writes, for each row of logits [rows × vocab], a record
// into out (TopRecordWords(capacity) words a row): the number of
// candidates n, the threshold, then the candidates' indices and their
// values (float32), each of capacity slots; every logit at or above the
// threshold is a candidate, at least the row's k largest among them, and
// where n exceeds capacity only capacity of them are written. maxima is
// rows × TopChunks float32 of scratch. The order of the candidates within
// a record may change from run to run; the set does not.
func (k *Kernels) TopCandidates(c *cuda.Ctx, logits cuda.DevicePtr, rows, vocab, topK int, maxima cuda.DevicePtr, capacity int, out cuda.DevicePtr) error {
	length, chunks := TopChunking(vocab)
	if topK < 1 || topK > chunks {
		return fmt.Errorf("kernels: top %d of %d logits: k must be 1 to %d", topK, vocab, chunks)
	}
	warps := cuda.LaunchConfig{Grid: cuda.Dim3{X: (chunks + 7) / 8, Y: rows}, Block: cuda.Dim3{X: 256}}
	if err := k.launch(c, "top_chunk_max", warps, logits, int32(vocab), int32(length), int32(chunks), maxima); err != nil {
		return err
	}
	if err := k.launch(c, "top_threshold", rowsOf(rows, TopChunks), maxima, int32(chunks), int32(topK), int32(capacity), out); err != nil {
		return err
	}
	return k.launch(c, "top_collect", warps, logits, int32(vocab), int32(length), int32(chunks), maxima, int32(capacity), out)
}

// SumDouble writes the sum of n float64 values to out[0].
func (k *Kernels) SumDouble(c *cuda.Ctx, v cuda.DevicePtr, n int, out cuda.DevicePtr) error {
	return k.launch(c, "sum_double", rowsOf(1, 1024), v, int32(n), out)
}

// MaskBytes is the size of the dropout mask of n elements: a bit each.
func MaskBytes(n int64) int64 { return (n + 7) / 8 }

// maskKernel is the dropout kernel name for n elements at ptrs: its _vec
// form when they are whole 16-byte vectors.
func (k *Kernels) maskKernel(name string, n int64, ptrs ...cuda.DevicePtr) string {
	if n%8 == 0 && k.vectors(n, ptrs...) {
		return name + "_vec"
	}
	return name
}

// DropoutRecord writes x with dropout d of stream applied to out and the
// elements it kept to mask (MaskBytes(n)), for DropoutReplay and DropoutAdd.
func (k *Kernels) DropoutRecord(c *cuda.Ctx, x, out, mask cuda.DevicePtr, n int64, d trainer.Dropout, stream uint32) error {
	return k.launch(c, k.maskKernel("dropout_record", n, x, out), k.grid(MaskBytes(n)), x, out, mask, n,
		uint32(d.Seed), uint32(d.Seed>>32), stream, d.Threshold, d.Scale)
}

// DropoutReplay writes x with a recorded dropout of scale applied to out.
func (k *Kernels) DropoutReplay(c *cuda.Ctx, x, out, mask cuda.DevicePtr, n int64, scale float32) error {
	return k.launch(c, k.maskKernel("dropout_replay", n, x, out), k.grid((MaskBytes(n)+1)/2), x, out, mask, n, scale)
}

// DropoutAdd adds src through a recorded dropout of scale to the float32
// dst.
func (k *Kernels) DropoutAdd(c *cuda.Ctx, src, dst, mask cuda.DevicePtr, n int64, scale float32) error {
	return k.launch(c, k.maskKernel("dropout_add", n, src, dst), k.grid((MaskBytes(n)+1)/2), src, dst, mask, n, scale)
}

// LoRAGradParts is the most parts one LoRADropoutGrad takes (lora.cu's
// lora_dropout_grad: q, k and v).
const LoRAGradParts = 3

// LoRAGradPart is one projection's share of LoRADropoutGrad: its dxa
// [T × r] (the gradient of x·Aᵀ), its lora_A [r × n] as activations, and
// the dropout mask DropoutRecord drew for its input.
type LoRAGradPart struct{ DXA, A, Mask cuda.DevicePtr }

// FusesLoRADropoutGrad reports whether LoRADropoutGrad takes parts of
// width n at rank r into dx: bfloat16 activations, n a multiple of 64, r
// even and at most 64, and the pointers aligned as its loads need. Elsewhere
// the GEMM and DropoutAdd do the same, a projection at a time.
func (k *Kernels) FusesLoRADropoutGrad(parts []LoRAGradPart, dx cuda.DevicePtr, n, r int) bool {
	if k.Prec != BF16 || n%64 != 0 || r%2 != 0 || r > 64 || len(parts) < 1 || len(parts) > LoRAGradParts || dx%8 != 0 {
		return false
	}
	for _, p := range parts {
		if p.A%16 != 0 || p.DXA%4 != 0 || p.Mask%8 != 0 {
			return false
		}
	}
	return true
}

// LoRADropoutGrad adds to the float32 dx [T × n], for each of its parts in
// order, scale (the dropout's) times its mask times dxa·A
// rounded to activations: what the GEMM into activations and DropoutAdd
// add, with dx read and written once for all the parts. Without add it
// writes that sum from zero and does not read dx.
func (k *Kernels) LoRADropoutGrad(c *cuda.Ctx, parts []LoRAGradPart, dx cuda.DevicePtr, T, n, r int, scale float32, add bool) error {
	if !k.FusesLoRADropoutGrad(parts, dx, n, r) {
		return fmt.Errorf("kernels: LoRADropoutGrad of %d parts at width %d, rank %d", len(parts), n, r)
	}
	var p [LoRAGradParts]LoRAGradPart
	copy(p[:], parts)
	cfg := cuda.LaunchConfig{Grid: cuda.Dim3{X: n / 64, Y: (T + 127) / 128}, Block: cuda.Dim3{X: 256}}
	return k.launch(c, "lora_dropout_grad", cfg, p[0].DXA, p[0].A, p[0].Mask, p[1].DXA, p[1].A, p[1].Mask,
		p[2].DXA, p[2].A, p[2].Mask, int32(len(parts)), dx, int32(T), int32(n), int32(r), scale, boolInt(add))
}

// F32ToAct converts n float32 values to activations.
func (k *Kernels) F32ToAct(c *cuda.Ctx, src, dst cuda.DevicePtr, n int64) error {
	return k.launch(c, "f32_to_act", k.grid(n), src, dst, n)
}

// F32ToActRows converts src [rows × cols] float32 to activations, a row
// every ld activations of dst (ld ≥ cols).
func (k *Kernels) F32ToActRows(c *cuda.Ctx, src, dst cuda.DevicePtr, rows, cols, ld int) error {
	if ld < cols {
		return fmt.Errorf("kernels: F32ToActRows: rows of %d values %d apart", cols, ld)
	}
	if cols%4 == 0 && ld%4 == 0 && src%16 == 0 && dst%16 == 0 {
		n := int64(rows) * int64(cols/4)
		return k.launch(c, "f32_to_act_rows_vec", k.grid(n), src, dst, int64(rows), int32(cols), int32(ld))
	}
	n := int64(rows) * int64(cols)
	return k.launch(c, "f32_to_act_rows", k.grid(n), src, dst, int64(rows), int32(cols), int32(ld))
}

// AddF32 adds n float32 values of src to dst.
func (k *Kernels) AddF32(c *cuda.Ctx, src, dst cuda.DevicePtr, n int64) error {
	return k.launch(c, "add_f32", k.grid(n), src, dst, n)
}

// Stored dtypes of checkpoint tensors, as the kernels number them.
const (
	StoredBF16 = 0
	StoredF16  = 1
	StoredF32  = 2
)

// Rounding of dequantised weights to a checkpoint dtype.
const (
	RoundNone = 0
	RoundBF16 = 1
	RoundF16  = 2
)

// NF4QuantizeBlocks quantises n stored values (dtype one of the Stored
// constants) in blocks of 64: packed receives (n+1)/2 bytes, absmax one
// float per block.
func (k *Kernels) NF4QuantizeBlocks(c *cuda.Ctx, src cuda.DevicePtr, dtype int, n int64, packed, absmax cuda.DevicePtr) error {
	blocks := (n + 63) / 64
	cfg := cuda.LaunchConfig{Grid: cuda.Dim3{X: int((blocks + 7) / 8)}, Block: cuda.Dim3{X: 256}}
	return k.launch(c, "nf4_quantize_blocks", cfg, src, int32(dtype), n, packed, absmax)
}

// nf4DequantUnroll is the units of eight weights each thread of
// nf4_dequantize8 takes a tile (nf4.cu's NF4_DQ_UNROLL).
const nf4DequantUnroll = 4

// NF4Dequantize writes the n weights an NF4 tensor encodes as activations,
// rounded to the checkpoint dtype (a Round constant).
func (k *Kernels) NF4Dequantize(c *cuda.Ctx, packed, absmaxQ, absmax2 cuda.DevicePtr, offset float32, n int64, round int, out cuda.DevicePtr) error {
	if n%8 == 0 && packed%4 == 0 && out%16 == 0 {
		// One row of all the units: the kernel then writes them in order.
		units := n / 8
		row := uint32(min(units, 1<<31))
		return k.nf4Dequantize8(c, packed, absmaxQ, absmax2, offset, units, row, row, round, out)
	}
	return k.launch(c, "nf4_dequantize", k.grid(n), packed, absmaxQ, absmax2, offset, n, int32(round), out)
}

// NF4DequantizeRows is NF4Dequantize of a weight [rows × in] whose rows go
// ld activations apart in out (ld ≥ in), leaving the columns between for
// other values (FoldLoRAColumns). It needs in and ld multiples of 8 and
// fewer than 2³² eight-weight units.
func (k *Kernels) NF4DequantizeRows(c *cuda.Ctx, packed, absmaxQ, absmax2 cuda.DevicePtr, offset float32, rows, in, ld int, round int, out cuda.DevicePtr) error {
	units := int64(rows) * int64(in) / 8
	if in%8 != 0 || ld%8 != 0 || ld < in || units >= 1<<32 || packed%4 != 0 || out%16 != 0 {
		return fmt.Errorf("kernels: NF4DequantizeRows: %d rows of %d weights, %d apart", rows, in, ld)
	}
	return k.nf4Dequantize8(c, packed, absmaxQ, absmax2, offset, units, uint32(in/8), uint32(ld/8), round, out)
}

// nf4Dequantize8 launches nf4_dequantize8 over units of eight weights,
// rows of rowUnits units going ldUnits units apart in out.
func (k *Kernels) nf4Dequantize8(c *cuda.Ctx, packed, absmaxQ, absmax2 cuda.DevicePtr, offset float32, units int64, rowUnits, ldUnits uint32, round int, out cuda.DevicePtr) error {
	return k.launch(c, "nf4_dequantize8", k.grid((units+nf4DequantUnroll-1)/nf4DequantUnroll), packed, absmaxQ, absmax2, offset, units,
		rowUnits, ldUnits, int32(round), out)
}

// NF4TileBytes is the size of NF4RepackTiles' two outputs for a weight
// [rows × in]: the codes (512 bytes a 16-row tile and 64-block) and the
// absmax codes (16 bytes).
func NF4TileBytes(rows, in int) (codes, absmaxQ int64) {
	n := int64((rows+15)/16) * int64(in/64)
	return 512 * n, 16 * n
}

// NF4RepackTiles writes an NF4 weight [rows × in] (in a multiple of 64)
// again in the order decode_token reads it (nf4_tile_repack): its codes
// into tileCodes and its absmax codes into tileAbsmaxQ (NF4TileBytes).
func (k *Kernels) NF4RepackTiles(c *cuda.Ctx, packed, absmaxQ cuda.DevicePtr, rows, in int, tileCodes, tileAbsmaxQ cuda.DevicePtr) error {
	if in%64 != 0 || rows < 1 || packed%8 != 0 || tileCodes%16 != 0 || tileAbsmaxQ%2 != 0 {
		return fmt.Errorf("kernels: NF4RepackTiles: %d rows of %d weights (whole 64-blocks, aligned buffers)", rows, in)
	}
	codes, _ := NF4TileBytes(rows, in)
	return k.launch(c, "nf4_tile_repack", k.grid(codes/16), packed, absmaxQ, int32(rows), int32(in), tileCodes, tileAbsmaxQ)
}

// FoldLoRAColumns writes scale·b (b [rows × r], activations) into columns
// col .. col + r - 1 of w [rows × ld] and zeros into columns zero .. zero +
// r - 1: a dequantised weight widened along K so that one GEMM adds its
// LoRA update (x·Aᵀ in the input's matching columns) to the frozen
// product.
func (k *Kernels) FoldLoRAColumns(c *cuda.Ctx, w cuda.DevicePtr, rows, ld, col, zero int, b cuda.DevicePtr, r int, scale float32) error {
	return k.launch(c, "lora_fold_columns", k.grid(int64(rows)*int64(r)), w, int32(rows), int32(ld), int32(col), int32(zero), b, int32(r), scale)
}

// CopyActRows copies src [rows × cols] (rows srcLD activations apart) into
// dst (rows dstLD apart).
func (k *Kernels) CopyActRows(c *cuda.Ctx, src cuda.DevicePtr, srcLD int, dst cuda.DevicePtr, dstLD, rows, cols int) error {
	size := k.Prec.Size()
	whole := func(n int) bool { return int64(n)*size%16 == 0 }
	if units := int64(rows) * int64(cols) * size / 16; whole(cols) && whole(srcLD) && whole(dstLD) && src%16 == 0 && dst%16 == 0 && units < 1<<32 {
		u := func(n int) uint32 { return uint32(int64(n) * size / 16) }
		return k.launch(c, "copy_rows16", k.grid(units), src, u(srcLD), dst, u(dstLD), uint32(rows), u(cols))
	}
	return k.launch(c, "act_copy_rows", k.grid(int64(rows)*int64(cols)), src, int32(srcLD), dst, int32(dstLD), int64(rows), int32(cols))
}

// GEMVTokens is the most tokens NF4GEMV and GEMV take: the rows of a
// decoding step at small batch, where reading the weights is the whole
// cost.
const GEMVTokens = 8 // nf4.cu: a tensor-core tile's eight columns

// NF4Matrix is a weight [Rows × in] in its NF4 form (packed codes, absmax
// codes, second-level scales and their offset) and where its product goes.
// TileCodes and TileAbsmaxQ, where not 0, are NF4RepackTiles' copy of the
// codes, which NF4GEMVPair then reads instead (the same products).
type NF4Matrix struct {
	Packed, AbsmaxQ, Absmax2 cuda.DevicePtr
	Offset                   float32
	Rows                     int
	Out                      cuda.DevicePtr
	TileCodes, TileAbsmaxQ   cuda.DevicePtr
}

// NF4GEMV computes out [T × rows] = x [T × in]·Wᵀ from W [rows × in] in
// its NF4 form, without dequantising it to memory first. In bf16, for rows
// whose length is a multiple of 64, it runs on tensor cores and applies
// each 64-block's scale to the block's sum: the codes enter rounded to
// bfloat16 where NF4Dequantize rounds every code·scale, so the two agree
// within bfloat16's precision. Otherwise the products are those of the
// weights NF4Dequantize would write (rounded to the checkpoint dtype
// round), summed in another order. in must be a multiple of 32 and T at
// most GEMVTokens.
func (k *Kernels) NF4GEMV(c *cuda.Ctx, packed, absmaxQ, absmax2 cuda.DevicePtr, offset float32, round int, x cuda.DevicePtr, T, rows, in int, out cuda.DevicePtr) error {
	return k.NF4GEMVPair(c, NF4Matrix{Packed: packed, AbsmaxQ: absmaxQ, Absmax2: absmax2, Offset: offset, Rows: rows, Out: out}, NF4Matrix{}, round, x, T, in)
}

// NF4GEMVPair is NF4GEMV for two matrices of one input (k and v, gate and
// up; b.Rows 0 for none): on tensor cores in one launch, each output as
// NF4GEMV would write it alone.
func (k *Kernels) NF4GEMVPair(c *cuda.Ctx, a, b NF4Matrix, round int, x cuda.DevicePtr, T, in int) error {
	for _, m := range []NF4Matrix{a, b} {
		if m.Rows > 0 && m.Packed%16 != 0 {
			return fmt.Errorf("kernels: nf4_gemv takes 16-byte aligned codes")
		}
	}
	if T < 1 || T > GEMVTokens || in%32 != 0 || x%16 != 0 {
		return fmt.Errorf("kernels: nf4_gemv takes 1 to %d tokens, rows whose length is a multiple of 32, and 16-byte aligned inputs (got %d tokens, rows of %d)",
			GEMVTokens, T, in)
	}
	if k.Prec == BF16 && in%64 == 0 {
		// The blocks stride over the 16-row tiles of both, as many as fit
		// at once.
		cfg := gemvMMAConfig(a.Rows + (b.Rows+15)/16*16)
		cfg.Grid.X = min(cfg.Grid.X, nf4BlocksPerSM*k.sms)
		if a.TileCodes != 0 && (b.Rows == 0 || b.TileCodes != 0) {
			return k.launch(c, "nf4_gemv_mma_tiled", cfg, a.TileCodes, a.TileAbsmaxQ, a.Absmax2, a.Offset, int32(a.Rows), a.Out,
				b.TileCodes, b.TileAbsmaxQ, b.Absmax2, b.Offset, int32(b.Rows), b.Out, x, int32(T), int32(in))
		}
		return k.launch(c, "nf4_gemv_mma", cfg, a.Packed, a.AbsmaxQ, a.Absmax2, a.Offset, int32(a.Rows), a.Out,
			b.Packed, b.AbsmaxQ, b.Absmax2, b.Offset, int32(b.Rows), b.Out, x, int32(T), int32(in))
	}
	for _, m := range []NF4Matrix{a, b} {
		if m.Rows == 0 {
			continue
		}
		// Four warps a block, two rows (NF4_GEMV_ROWS) a warp; the blocks
		// stride over the rest.
		blocks := min((m.Rows+7)/8, 4*k.sms)
		if err := k.launch(c, "nf4_gemv", cuda.LaunchConfig{Grid: cuda.Dim3{X: blocks}, Block: cuda.Dim3{X: 128}},
			m.Packed, m.AbsmaxQ, m.Absmax2, m.Offset, int32(round), x, int32(T), int32(m.Rows), int32(in), m.Out); err != nil {
			return err
		}
	}
	return nil
}

// GEMV computes out [T × rows] = x [T × in]·Wᵀ for the few tokens of a
// decoding step from dense activation weights W [rows × in], on tensor
// cores (bf16 sessions only). Rows may stack matrices of partRows rows
// each (k and v, gate and up, stored one after the other): matrix m's
// [T × partRows] goes to out + m·partStride elements. in must be a
// multiple of 32, T at most GEMVTokens, w and x 16-byte aligned.
func (k *Kernels) GEMV(c *cuda.Ctx, w, x cuda.DevicePtr, T, rows, in, partRows int, partStride int64, out cuda.DevicePtr) error {
	if k.Prec != BF16 || T < 1 || T > GEMVTokens || in%32 != 0 || w%16 != 0 || x%16 != 0 || partRows < 1 || rows%partRows != 0 {
		return fmt.Errorf("kernels: gemv_mma takes bf16, 1 to %d tokens, rows whose length is a multiple of 32, whole stacked matrices and 16-byte aligned inputs (got %s, %d tokens, %d rows of %d in parts of %d)",
			GEMVTokens, k.Prec, T, rows, in, partRows)
	}
	return k.launch(c, "gemv_mma", gemvMMAConfig(rows), w, x, int32(T), int32(rows), int32(in), int32(partRows), partStride, out)
}

// LoRAFewTokens is the most tokens LoRAFew takes (decode.cu's
// LORA_FEW_TOKENS).
const LoRAFewTokens = 16

// loraFewSpan is how many 16-byte groups of a row of A one block of
// lora_xa_few sums (one a thread): a longer row is cut into spans, so
// that a group's few rows of A still spread over the whole GPU.
const loraFewSpan = 256

// LoRAProduct is one projection's share of LoRAFew: its adapter's A
// [rank × in] and B [Rows × rank] as activations, and its product's output
// Out [T × Rows], to which the update is added.
type LoRAProduct struct {
	A, B, Out cuda.DevicePtr
	Rows      int
}

// LoRAFewPartBytes is the scratch LoRAFew needs for rows of A up to in
// long at the given rank, in either precision: float32 partial sums of
// x·Aᵀ, a set for each span of a row (float32 activations have the most).
func LoRAFewPartBytes(in, rank int) int64 {
	return int64(loraFewSpans(in, 4)) * 3 * int64(rank) * LoRAFewTokens * 4
}

// loraFewSpans is how many spans a row of in activations, vec to 16
// bytes, is cut into.
func loraFewSpans(in, vec int) int {
	return (in/vec + loraFewSpan - 1) / loraFewSpan
}

// loraFewShared is the shared memory every block may take without asking:
// lora_b_few's x·Aᵀ of a group must fit it.
const loraFewShared = 48 << 10

// LoRAFewFits reports whether LoRAFew takes T tokens at the given rank:
// x·Aᵀ of a group (at most 3·T·rank float32 values) must fit
// loraFewShared.
func LoRAFewFits(T, rank int) bool {
	return T >= 1 && T <= LoRAFewTokens && rank >= 1 && 3*T*rank*4 <= loraFewShared
}

// LoRAFew adds the adapter's updates of up to three projections of one
// input x [T × in] to their outputs, for the few tokens of a decoding
// step: out += scale·(x·Aᵀ)·Bᵀ with x·Aᵀ rounded to activations, as the
// GEMMs of longer steps compute it, in two launches for the group where
// those take two GEMMs a projection. part holds LoRAFewPartBytes(in,
// rank).
func (k *Kernels) LoRAFew(c *cuda.Ctx, x cuda.DevicePtr, T, in, rank int, scale float32, ps []LoRAProduct, part cuda.DevicePtr) error {
	if !LoRAFewFits(T, rank) || len(ps) < 1 || len(ps) > 3 || in%k.vec() != 0 || x%16 != 0 {
		return fmt.Errorf("kernels: lora_few takes 1 to %d tokens, ranks up to %d at that, 1 to 3 projections, rows of whole 16-byte groups and a 16-byte aligned input (got %d tokens, rank %d, %d projections, rows of %d)",
			LoRAFewTokens, loraFewShared/(12*max(T, 1)), T, rank, len(ps), in)
	}
	var p [3]LoRAProduct
	total := 0
	for i, q := range ps {
		if q.A%16 != 0 || q.Rows < 1 {
			return fmt.Errorf("kernels: lora_few's projection %d: A must be 16-byte aligned and the output at least a row (%d rows)", i, q.Rows)
		}
		p[i] = q
		total += q.Rows
	}
	spans, n := loraFewSpans(in, k.vec()), len(ps)
	xa := cuda.LaunchConfig{Grid: cuda.Dim3{X: n * rank, Y: spans}, Block: cuda.Dim3{X: 256}}
	if err := k.launch(c, "lora_xa_few", xa, x, int32(T), int32(in), int32(rank), p[0].A, p[1].A, p[2].A, int32(loraFewSpan), part); err != nil {
		return err
	}
	vec := rank%k.vec() == 0
	for _, q := range ps {
		vec = vec && q.B%16 == 0
	}
	b := cuda.LaunchConfig{Grid: cuda.Dim3{X: (T*total + 255) / 256}, Block: cuda.Dim3{X: 256}, SharedMem: n * T * rank * 4}
	return k.launch(c, "lora_b_few", b, part, int32(spans), int32(T), int32(rank), int32(n), p[0].B, p[1].B, p[2].B,
		p[0].Out, p[1].Out, p[2].Out, int32(p[0].Rows), int32(p[1].Rows), int32(p[2].Rows), scale, boolInt(vec))
}

// nf4BlocksPerSM is how many blocks of nf4_gemv_mma a multiprocessor
// holds at once: its launch bound (NF4_MIN_BLOCKS, given to the compiler
// by Sources), which holds its registers to fit, beside 38 KiB of shared
// memory a block.
const nf4BlocksPerSM = 3

// gemvMMAConfig is the launch of gemv_mma and nf4_gemv_mma: a block of
// eight warps (GEMV_WARPS, NF4_MMA_WARPS) for every 16 rows.
func gemvMMAConfig(rows int) cuda.LaunchConfig {
	return cuda.LaunchConfig{Grid: cuda.Dim3{X: (rows + 15) / 16}, Block: cuda.Dim3{X: 8 * 32}}
}

// Resources reports what kernel name takes from a multiprocessor.
func (k *Kernels) Resources(name string) (cuda.Resources, error) {
	f, ok := k.fns[name]
	if !ok {
		return cuda.Resources{}, fmt.Errorf("kernels: no kernel %s", name)
	}
	return f.Resources()
}

// StoredToAct converts n stored values to activations.
func (k *Kernels) StoredToAct(c *cuda.Ctx, src cuda.DevicePtr, dtype int, n int64, out cuda.DevicePtr) error {
	return k.launch(c, "stored_to_act", k.grid(n), src, int32(dtype), n, out)
}

// StoredToF32 converts n stored values to float32.
func (k *Kernels) StoredToF32(c *cuda.Ctx, src cuda.DevicePtr, dtype int, n int64, out cuda.DevicePtr) error {
	return k.launch(c, "stored_to_f32", k.grid(n), src, int32(dtype), n, out)
}

// RandomNormalBF16 fills out with n bfloat16 values drawn from N(0, std²)
// by Philox stream (seed, stream).
func (k *Kernels) RandomNormalBF16(c *cuda.Ctx, out cuda.DevicePtr, n int64, seed uint64, stream uint32, std float32) error {
	return k.launch(c, "random_normal_bf16", k.grid((n+3)/4), out, n, uint32(seed), uint32(seed>>32), stream, std)
}

// AdamW applies trainer.AdamW's update to n flat parameters, the gradients
// scaled by gradScale (the clipping factor, 1 without clipping).
func (k *Kernels) AdamW(c *cuda.Ctx, p, g, m, v cuda.DevicePtr, n int64, gradScale float32, s trainer.AdamWScalars) error {
	return k.launch(c, "adamw_step", k.grid(n), p, g, m, v, n, gradScale, s.OneMinusBeta1, s.Beta2, s.OneMinusBeta2,
		s.Decay, s.StepSize, s.BiasCorrection2Sqrt, s.Eps)
}

// Adam8F32 applies the 8-bit optimizer's update rule to n parameters that
// keep float32 moments.
func (k *Kernels) Adam8F32(c *cuda.Ctx, p, g, m, v cuda.DevicePtr, n int64, gradScale float32, s trainer.Adam8Scalars) error {
	return k.launch(c, "adam8_f32_step", k.grid(n), p, g, m, v, n, gradScale, s.Beta1, s.OneMinusBeta1, s.Beta2, s.OneMinusBeta2,
		s.StepSize, s.EpsScaled, s.Decay, boolInt(s.WeightDecay))
}

// Adam8 applies blockwise 8-bit AdamW to blocks state blocks: block b
// covers start[b] .. start[b] + len[b] of the flat parameters.
func (k *Kernels) Adam8(c *cuda.Ctx, p, g, q1, q2, absmax1, absmax2, start, length cuda.DevicePtr, blocks int, gradScale float32, s trainer.Adam8Scalars) error {
	return k.launch(c, "adam8_step", rowsOf(blocks, trainer.Adam8BlockSize), p, g, q1, q2, absmax1, absmax2, start, length, gradScale,
		s.Beta1, s.OneMinusBeta1, s.Beta2, s.OneMinusBeta2, s.StepSize, s.EpsScaled, s.Decay, boolInt(s.WeightDecay))
}

// NormPartials is the number of partial sums SquaredNorm uses; its scratch
// holds this many float64 values plus one.
const NormPartials = 256

// SquaredNorm writes the sum of squares of n float32 values, in float64,
// to scratch[NormPartials], in a fixed order.
func (k *Kernels) SquaredNorm(c *cuda.Ctx, g cuda.DevicePtr, n int64, scratch cuda.DevicePtr) error {
	cfg := cuda.LaunchConfig{Grid: cuda.Dim3{X: NormPartials}, Block: cuda.Dim3{X: 256}}
	if err := k.launch(c, "sq_norm_partial", cfg, g, n, scratch); err != nil {
		return err
	}
	return k.SumDouble(c, scratch, NormPartials, scratch.Add(8*NormPartials))
}

func boolInt(b bool) int32 {
	if b {
		return 1
	}
	return 0
}
