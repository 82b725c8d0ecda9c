package kernels

import (
	"encoding/binary"
	"fmt"
	"math"

	"gemmaft/cuda"
)

// TokenMatrix is one projection as decode_token reads it: dense [rows ×
// in] activations, or NF4 in bitsandbytes' layout (packed codes, a code
// per 64-block for its absmax, a scale per 256 blocks, an offset), with,
// where the decoder made them, its codes and absmax codes per 16-row tile
// (NF4RepackTiles), which decode_token then reads instead.
type TokenMatrix struct {
	Weights                cuda.DevicePtr // the activations, or the packed codes
	AbsmaxQ, Absmax2       cuda.DevicePtr // NF4 only
	Offset                 float32
	NF4                    bool
	TileCodes, TileAbsmaxQ cuda.DevicePtr // NF4: NF4RepackTiles' copy, or 0
}

// TokenLayer is one block of the model as decode_token reads it: every
// projection dense, or every one NF4.
type TokenLayer struct {
	Q, K, V, O, Gate, Up, Down                     TokenMatrix
	InputNorm, PostAttnNorm, PreFFNorm, PostFFNorm cuda.DevicePtr // float32
	QNorm, KNorm                                   cuda.DevicePtr
	KCache, VCache                                 cuda.DevicePtr // [sequences × CacheLen × kv heads × head_dim]
	CacheLen                                       int            // rows a sequence has (a ring on sliding layers)
	Window                                         int            // 0 on global layers
	Rope                                           int            // the rotary table: 0 sliding, 1 global
}

// tokenMatrixBytes and tokenLayerBytes are the sizes of token.cu's
// tok_mat (3 pointers, a float, an int, 2 pointers) and tok_layer (7 of
// them, 8 pointers, 4 ints).
const (
	tokenMatrixBytes = 3*8 + 4 + 4 + 2*8
	tokenLayerBytes  = 7*tokenMatrixBytes + 8*8 + 4*4
)

// EncodeTokenLayers lays layers out as decode_token's table.
func EncodeTokenLayers(layers []TokenLayer) []byte {
	out := make([]byte, 0, len(layers)*tokenLayerBytes)
	for _, l := range layers {
		for _, m := range []TokenMatrix{l.Q, l.K, l.V, l.O, l.Gate, l.Up, l.Down} {
			for _, p := range []cuda.DevicePtr{m.Weights, m.AbsmaxQ, m.Absmax2} {
				out = binary.LittleEndian.AppendUint64(out, uint64(p))
			}
			out = binary.LittleEndian.AppendUint32(out, math.Float32bits(m.Offset))
			out = binary.LittleEndian.AppendUint32(out, uint32(boolInt(m.NF4)))
			out = binary.LittleEndian.AppendUint64(out, uint64(m.TileCodes))
			out = binary.LittleEndian.AppendUint64(out, uint64(m.TileAbsmaxQ))
		}
		for _, p := range []cuda.DevicePtr{l.InputNorm, l.PostAttnNorm, l.PreFFNorm, l.PostFFNorm, l.QNorm, l.KNorm, l.KCache, l.VCache} {
			out = binary.LittleEndian.AppendUint64(out, uint64(p))
		}
		for _, v := range []int{l.CacheLen, l.Window, l.Rope, 0} {
			out = binary.LittleEndian.AppendUint32(out, uint32(int32(v)))
		}
	}
	return out
}

// TokenLoRA is one projection's adapter as decode_token_lora reads it
// (token.cu's tok_lora): A [rank × in] and B [rows × rank], activations,
// or both 0 where the adapter leaves the projection alone.
type TokenLoRA struct{ A, B cuda.DevicePtr }

// EncodeTokenLoRA lays each layer's adapter out as decode_token_lora's
// table: q, k, v, o, gate, up, down (the order of trainer.AllModules).
func EncodeTokenLoRA(layers [][7]TokenLoRA) []byte {
	out := make([]byte, 0, 16*7*len(layers))
	for _, l := range layers {
		for _, m := range l {
			out = binary.LittleEndian.AppendUint64(out, uint64(m.A))
			out = binary.LittleEndian.AppendUint64(out, uint64(m.B))
		}
	}
	return out
}

// TokenShape is the model decode_token runs, and the caches' length.
type TokenShape struct {
	Hidden, Heads, KVHeads, Intermediate, Layers int
	Vocab                                        int
	MaxKeys                                      int  // the most positions a step attends to
	NF4                                          bool // the projections are NF4
	Eps, AttnScale                               float64
	EmbedScale                                   float32
	// LoRARank, when positive, runs decode_token_lora: an adapter of that
	// rank, its update scaled by LoRAScale.
	LoRARank  int
	LoRAScale float32
}

// tokenKernel is the kernel that runs sh.
func tokenKernel(sh TokenShape) string {
	if sh.LoRARank > 0 {
		return "decode_token_lora"
	}
	return "decode_token"
}

// tokenChunk is token.cu's TOK_CHUNK: the keys one attention split takes.
const tokenChunk = 32

// tokenThreads is token.cu's TOK_THREADS.
const tokenThreads = 512

// TokenBuffers is the bytes of decode_token's device buffers for sh.
type TokenBuffers struct {
	Work    int64 // activations the phases pass on
	Records int64 // the attention's split records
	Sync    int64 // the barrier's counter, a counter per head and the lm_head's, a pair per block, the adapter's counter
	Step    int64 // the step's upload (EncodeTokenStep)
	XA      int64 // with an adapter: a phase's x·Aᵀ, three projections' at most
}

// TokenBuffers sizes decode_token's buffers for sh.
func (k *Kernels) TokenBuffers(sh TokenShape) TokenBuffers {
	hd := int64(k.HeadDim)
	H, I := int64(sh.Hidden), int64(sh.Intermediate)
	q, kv := int64(sh.Heads)*hd, int64(sh.KVHeads)*hd
	splits := int64((sh.MaxKeys + tokenChunk - 1) / tokenChunk)
	return TokenBuffers{
		Work:    (4*H + 2*q + 2*kv + I) * k.Prec.Size(), // x, x1, q|k|v, att, o, d, act
		Records: 4 * int64(sh.Heads) * splits * (hd + 2),
		Sync:    4 * int64(1+sh.Heads+1+2*k.sms+1),
		Step:    4 * (4 + 2*hd),
		XA:      3 * int64(sh.LoRARank) * k.Prec.Size(),
	}
}

// EncodeTokenStep is the step decode_token reads: the token's id, its
// sequence and its position, whether the token is instead the one the
// launch before picked (read from best on the device: a greedy decoding
// can then queue a step before the host has seen its token), then the
// rotary tables of its position, [cos | sin] of head_dim/2 values each,
// for sliding then global layers.
func EncodeTokenStep(id, seq, pos int32, fromPick bool, cos, sin [2][]float32) []uint32 {
	flag := uint32(0)
	if fromPick {
		flag = 1
	}
	out := []uint32{uint32(id), uint32(seq), uint32(pos), flag}
	for t := range cos {
		for _, tab := range [][]float32{cos[t], sin[t]} {
			for _, v := range tab {
				out = append(out, math.Float32bits(v))
			}
		}
	}
	return out
}

// tokenSharedBytes is decode_token's dynamic shared memory (tok_carve's
// layout).
func (k *Kernels) tokenSharedBytes(sh TokenShape) int {
	round4 := func(n int) int { return (n + 3) / 4 * 4 }
	q := sh.Heads * k.HeadDim
	v := max(sh.Hidden, q, sh.Intermediate, 2*sh.Hidden, (3*q+1)/2) // a phase's input, and but for down's its bfloat16 copy after it
	floats := round4(v) + 3*round4(sh.Hidden) + 2*16 + 32 + 5*k.HeadDim + tokenChunk + tokenThreads*k.vec() + 4
	floats += 2 * tokenLayerBytes / 4 // the layer table's entries of this layer and the next
	if sh.NF4 || sh.LoRARank > 0 {
		floats += 256*nf4PairCopies + 256 // nf4_mma_tables' pairs and absmax codes (carved before x·Aᵀ)
	}
	if sh.LoRARank > 0 {
		floats += 3*sh.LoRARank + k.tokenDeferredSums(sh) // x·Aᵀ, a phase's row sums
	}
	return 4 * floats
}

// tokenDeferredSums is the most row sums a block of decode_token_lora
// keeps for one product phase (tok_product's DEFER): its share of q, k
// and v stacked, of o's or down's rows, or of gate's and up's side by
// side, as tok_product splits rows (dense) or 16-row tiles (NF4) over the
// blocks.
func (k *Kernels) tokenDeferredSums(sh TokenShape) int {
	ceil := func(a, b int) int { return (a + b - 1) / b }
	blocks := max(k.sms, 1)              // a block a multiprocessor (unknown: one)
	share := func(segments ...int) int { // the most rows (NF4: of whole tiles) a block takes
		n := 0
		for _, rows := range segments {
			if sh.NF4 {
				rows = 16 * ceil(rows, 16) // a segment's tiles
			}
			n += rows
		}
		if sh.NF4 {
			return 16 * ceil(n/16, blocks)
		}
		return ceil(n, blocks)
	}
	q, kv := sh.Heads*k.HeadDim, sh.KVHeads*k.HeadDim
	return max(share(q, kv, kv), share(sh.Hidden), 2*share(sh.Intermediate))
}

// tokenSharedMemory lets sh's kernel use the shared memory sh needs and
// returns it.
func (k *Kernels) tokenSharedMemory(sh TokenShape) (int, error) {
	name, shared := tokenKernel(sh), k.tokenSharedBytes(sh)
	if shared > k.tokenShared[name] {
		if err := k.fns[name].SetMaxDynamicSharedMemory(shared); err != nil {
			return 0, fmt.Errorf("%s: %d bytes of shared memory: %w", name, shared, err)
		}
		k.tokenShared[name] = shared
	}
	return shared, nil
}

// TokenResident reports why decode_token (decode_token_lora with an
// adapter) cannot run sh with a block on every multiprocessor at once (as
// its cooperative launch needs), or nil.
func (k *Kernels) TokenResident(sh TokenShape) error {
	shared, err := k.tokenSharedMemory(sh)
	if err != nil {
		return err
	}
	name := tokenKernel(sh)
	n, err := k.fns[name].BlocksPerSM(tokenThreads, shared)
	if err != nil {
		return err
	}
	if n < 1 {
		return fmt.Errorf("%s: a multiprocessor holds no block of %d threads with %d bytes of shared memory", name, tokenThreads, shared)
	}
	return nil
}

// nf4PairCopies is nf4.cuh's NF4_PAIR_COPIES.
const nf4PairCopies = 32

// TokenFits reports why decode_token cannot run sh on device, or nil:
// every row a whole number of 16-byte vectors (of 64-blocks for NF4, which
// it reads on tensor cores in bf16 only), heads a multiple of the
// key/value heads, and its shared memory within the device's.
func (k *Kernels) TokenFits(sh TokenShape, device cuda.DeviceInfo) error {
	v := k.vec()
	switch {
	case sh.NF4 && k.Prec != BF16:
		return fmt.Errorf("decode_token reads NF4 weights in bf16 only")
	case sh.NF4 && (sh.Hidden%64 != 0 || sh.Heads*k.HeadDim%64 != 0 || sh.Intermediate%64 != 0):
		return fmt.Errorf("decode_token reads NF4 rows of whole 64-blocks (hidden %d, heads × head_dim %d, intermediate %d)",
			sh.Hidden, sh.Heads*k.HeadDim, sh.Intermediate)
	case sh.Hidden%v != 0 || sh.Intermediate%v != 0 || k.HeadDim%v != 0:
		return fmt.Errorf("decode_token takes rows of whole 16-byte vectors (hidden %d, intermediate %d, head_dim %d)", sh.Hidden, sh.Intermediate, k.HeadDim)
	case sh.NF4 && sh.LoRARank > 0 && sh.KVHeads*k.HeadDim%16 != 0:
		// decode_token_lora keeps a phase's sums by stacked row, which
		// for q, k and v is the tiles' order only where each is whole tiles.
		return fmt.Errorf("decode_token_lora reads NF4 k and v of whole 16-row tiles (key/value heads × head_dim %d)", sh.KVHeads*k.HeadDim)
	case sh.KVHeads < 1 || sh.Heads%sh.KVHeads != 0:
		return fmt.Errorf("decode_token: %d heads over %d key/value heads", sh.Heads, sh.KVHeads)
	case k.tokenSharedBytes(sh) > device.MaxSharedOptin:
		return fmt.Errorf("decode_token needs %d bytes of shared memory a block, the device has %d", k.tokenSharedBytes(sh), device.MaxSharedOptin)
	}
	return nil
}

// DecodeToken runs one decoding step of one token through every block of
// the model, the final norm (into xf) and the tied lm_head (embed), into
// the float32 logits [vocab] and the most likely token best (the lowest id
// among equals), in one cooperative launch of a block per
// multiprocessor: layers is the EncodeTokenLayers table, step the
// EncodeTokenStep upload, work, records and sync buffers of TokenBuffers'
// sizes (sync's counters zero before the first launch; each launch leaves
// them zero).
//
// times, where not 0, receives TokenTimes' clock readings of every block.
// With sh.LoRARank, loras is the EncodeTokenLoRA table and xa a buffer of
// TokenBuffers' XA bytes.
func (k *Kernels) DecodeToken(c *cuda.Ctx, sh TokenShape, layers, embed, finalNorm, step, work, records, sync, xf, logits, best, times, loras, xa cuda.DevicePtr) error {
	shared, err := k.tokenSharedMemory(sh)
	if err != nil {
		return err
	}
	if err := c.MemsetD32Async(sync, 0, 1, nil); err != nil { // the barrier's counter
		return err
	}
	cfg := cuda.LaunchConfig{Grid: cuda.Dim3{X: k.sms}, Block: cuda.Dim3{X: tokenThreads}, SharedMem: shared, Cooperative: true}
	args := []any{layers, int32(sh.Layers), embed, sh.EmbedScale, finalNorm, step, work, records, sync, xf,
		logits, best, int32(sh.Hidden), int32(sh.Heads), int32(sh.KVHeads), int32(sh.Intermediate), int32(sh.Vocab), float32(sh.Eps),
		float32(sh.AttnScale), times}
	if sh.LoRARank > 0 {
		args = append(args, loras, int32(sh.LoRARank), sh.LoRAScale, xa)
	}
	return k.launch(c, tokenKernel(sh), cfg, args...)
}

// TokenTimes is the number of clock readings (uint64 nanoseconds)
// decode_token writes for sh with a times buffer: per block, in block
// order, its start, its arrival at and departure from each of the five
// barriers of every layer, and its finish.
func (k *Kernels) TokenTimes(sh TokenShape) int { return k.sms * (2 + 2*TokenBarriers*sh.Layers) }

// TokenBarriers is the grid barriers decode_token passes in a layer.
const TokenBarriers = 5

// TokenPhases names decode_token's phases in the order of a layer's
// barriers; the lm_head is the phase after the last.
var TokenPhases = [6]string{"norms, q, k, v", "attention", "o", "norms, gate, up", "down", "final norm, lm_head, pick"}
