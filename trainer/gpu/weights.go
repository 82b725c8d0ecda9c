package gpu

import (
	"fmt"

	"gemmaft/cuda"
	"gemmaft/trainer"
	"gemmaft/trainer/gpu/kernels"
	"gemmaft/trainer/safetensors"
)

// projection is one frozen projection on the device: NF4 (packed codes,
// double-quantised absmax) or, with quantize none, dense activations. A
// decoder may hold an NF4 projection in both forms (densify).
type projection struct {
	out, in int
	nf4     bool        // the NF4 buffers hold the weights
	packed  cuda.Buffer // (out·in + 1)/2 bytes
	absmaxQ cuda.Buffer // one byte per 64-block
	absmax2 cuda.Buffer // one float32 per 256 blocks
	offset  float32
	dense   cuda.Buffer // out·in activations, or none (Ptr 0)
	tiles   cuda.Buffer // NF4: codes, then absmax codes, per 16-row tile for decode_token (tileNF4), or none
}

func (p *projection) elements() int64 { return int64(p.out) * int64(p.in) }

// layerWeights are one block's frozen weights; norms are float32.
type layerWeights struct {
	inputNorm, postAttnNorm, preFFNorm, postFFNorm cuda.Buffer
	qNorm, kNorm                                   cuda.Buffer
	proj                                           [7]projection // in trainer.AllModules order
}

// weights are the model's frozen weights on the device.
type weights struct {
	embed     cuda.Buffer // [vocab × hidden] activations, also the tied lm_head
	finalNorm cuda.Buffer
	layers    []layerWeights
	// round is the checkpoint dtype NF4 dequantises to.
	round int
}

func moduleIndex(m trainer.Module) int {
	for i, x := range trainer.AllModules {
		if x == m {
			return i
		}
	}
	panic("unknown module " + string(m))
}

func storedDType(dt safetensors.DType) (int, error) {
	switch dt {
	case safetensors.BF16:
		return kernels.StoredBF16, nil
	case safetensors.F16:
		return kernels.StoredF16, nil
	case safetensors.F32:
		return kernels.StoredF32, nil
	}
	return 0, fmt.Errorf("dtype %s is not a weight dtype", dt)
}

func roundMode(dtype string) int {
	switch dtype {
	case "bfloat16":
		return kernels.RoundBF16
	case "float16":
		return kernels.RoundF16
	}
	return kernels.RoundNone
}

// loadWeights streams the checkpoint to the device one tensor at a time:
// each tensor's stored bytes are uploaded to a staging buffer, converted
// (norms to float32, the embedding to activations) or quantised to NF4 on
// the device, and the staging buffer is freed. Host memory holds one
// tensor's bytes at a time.
func (s *session) loadWeights(ck *trainer.Checkpoint, quantize bool) error {
	s.w = &weights{layers: make([]layerWeights, ck.Config.Layers), round: roundMode(ck.Config.DType)}
	return ck.Each(func(t trainer.WeightTensor) error {
		dtype, err := storedDType(t.DType)
		if err != nil {
			return err
		}
		return s.dev.Do(func(c *cuda.Ctx) error {
			staging, err := c.Alloc(int64(len(t.Raw)))
			if err != nil {
				return s.oom(c, err, "loading "+t.Name)
			}
			defer c.Free(staging)
			if err := cuda.Upload(c, staging.Ptr, t.Raw); err != nil {
				return err
			}
			return s.placeTensor(c, t, staging.Ptr, dtype, quantize)
		})
	})
}

// randomWeights creates a model of cfg's shape on the device with weights
// drawn from N(0, std²) (norms zero, as transformers initialises them),
// generated as bfloat16 tensor by tensor and placed as loadWeights places
// stored ones. Nothing is read from disk.
func (s *session) randomWeights(cfg *trainer.Config, seed uint64, std float64, quantize bool) error {
	s.w = &weights{layers: make([]layerWeights, cfg.Layers), round: roundMode(cfg.DType)}
	for i, t := range cfg.WeightTensors() {
		n := int64(1)
		for _, d := range t.Shape {
			n *= int64(d)
		}
		err := s.dev.Do(func(c *cuda.Ctx) error {
			staging, err := c.Alloc(2 * n)
			if err != nil {
				return s.oom(c, err, "creating "+t.Name)
			}
			defer c.Free(staging)
			if t.Role == trainer.RoleEmbed || t.Layer >= 0 && isProjection(t.Role) {
				err = s.k.RandomNormalBF16(c, staging.Ptr, n, seed, uint32(i), float32(std))
			} else {
				err = c.MemsetD8Async(staging.Ptr, 0, 2*n, nil)
			}
			if err != nil {
				return err
			}
			return s.placeTensor(c, t, staging.Ptr, kernels.StoredBF16, quantize)
		})
		if err != nil {
			return fmt.Errorf("%s: %w", t.Name, err)
		}
	}
	return nil
}

func isProjection(role string) bool {
	for _, m := range trainer.AllModules {
		if string(m) == role {
			return true
		}
	}
	return false
}

// placeTensor turns one stored tensor at src into its place in the
// session's weights.
func (s *session) placeTensor(c *cuda.Ctx, t trainer.WeightTensor, src cuda.DevicePtr, dtype int, quantize bool) error {
	n := int64(1)
	for _, d := range t.Shape {
		n *= int64(d)
	}
	var err error
	switch {
	case t.Role == trainer.RoleEmbed:
		if s.w.embed, err = s.alloc(c, n*s.k.Prec.Size(), "the embedding"); err != nil {
			return err
		}
		return s.k.StoredToAct(c, src, dtype, n, s.w.embed.Ptr)
	case !isProjection(t.Role):
		buf, err := s.alloc(c, 4*n, "norm weights")
		if err != nil {
			return err
		}
		if err := s.k.StoredToF32(c, src, dtype, n, buf.Ptr); err != nil {
			return err
		}
		s.placeNorm(t, buf)
		return nil
	}
	p := &s.w.layers[t.Layer].proj[moduleIndex(trainer.Module(t.Role))]
	p.out, p.in = t.Shape[0], t.Shape[1]
	if !quantize {
		if p.dense, err = s.alloc(c, n*s.k.Prec.Size(), t.Name); err != nil {
			return err
		}
		return s.k.StoredToAct(c, src, dtype, n, p.dense.Ptr)
	}
	return s.quantizeNF4(c, p, src, dtype, n)
}

func (s *session) placeNorm(t trainer.WeightTensor, buf cuda.Buffer) {
	if t.Layer < 0 {
		s.w.finalNorm = buf
		return
	}
	l := &s.w.layers[t.Layer]
	switch t.Role {
	case trainer.RoleInputNorm:
		l.inputNorm = buf
	case trainer.RolePostAttnNorm:
		l.postAttnNorm = buf
	case trainer.RolePreFFNorm:
		l.preFFNorm = buf
	case trainer.RolePostFFNorm:
		l.postFFNorm = buf
	case trainer.RoleQNorm:
		l.qNorm = buf
	case trainer.RoleKNorm:
		l.kNorm = buf
	}
}

// quantizeNF4 quantises n stored values at src into p: the 64-blocks on the
// device, then the double quantisation of their absmax values on the host
// (trainer.DoubleQuantize, shared with the CPU backend).
func (s *session) quantizeNF4(c *cuda.Ctx, p *projection, src cuda.DevicePtr, dtype int, n int64) error {
	blocks := (n + trainer.NF4BlockSize - 1) / trainer.NF4BlockSize
	var err error
	p.nf4 = true
	if p.packed, err = s.alloc(c, (n+1)/2, "NF4 weights"); err != nil {
		return err
	}
	absmax, err := c.Alloc(4 * blocks)
	if err != nil {
		return s.oom(c, err, "NF4 quantisation")
	}
	defer c.Free(absmax)
	if err := s.k.NF4QuantizeBlocks(c, src, dtype, n, p.packed.Ptr, absmax.Ptr); err != nil {
		return err
	}
	host := make([]float32, blocks)
	if err := cuda.Download(c, host, absmax.Ptr); err != nil {
		return err
	}
	q, absmax2, offset := trainer.DoubleQuantize(host)
	p.offset = offset
	if p.absmaxQ, err = s.alloc(c, int64(len(q)), "NF4 absmax"); err != nil {
		return err
	}
	if p.absmax2, err = s.alloc(c, 4*int64(len(absmax2)), "NF4 absmax"); err != nil {
		return err
	}
	if err := cuda.Upload(c, p.absmaxQ.Ptr, q); err != nil {
		return err
	}
	return cuda.Upload(c, p.absmax2.Ptr, absmax2)
}

// weight returns the projection as activations [out × in]: the dense
// weights, or the NF4 weights dequantised into scratch.
func (s *session) weight(c *cuda.Ctx, p *projection, scratch cuda.DevicePtr) (cuda.DevicePtr, error) {
	if p.dense.Ptr != 0 {
		return p.dense.Ptr, nil
	}
	err := s.k.NF4Dequantize(c, p.packed.Ptr, p.absmaxQ.Ptr, p.absmax2.Ptr, p.offset, p.elements(), s.w.round, scratch)
	return scratch, err
}

// densifyMargin is the device memory densify leaves free for what
// decoding allocates later (key/value caches, the attention workspace).
var densifyMargin int64 = 1 << 30

// densify adds to every NF4 projection its dequantised values, stored
// dense, when the device has the room for them: a decoding step past the
// few tokens the NF4 product takes (a prefill, a large batch) then reads
// each weight once (2 bytes) instead of reading its NF4 form and writing
// and reading it dense again, as the per-step dequantisation does. The
// values are the ones that path computes. Without the room the weights
// stay NF4 only, and those steps are slower, not refused.
func (s *session) densify(c *cuda.Ctx) error {
	act := s.k.Prec.Size()
	var grow int64
	for l := range s.w.layers {
		for i := range s.w.layers[l].proj {
			if p := &s.w.layers[l].proj[i]; p.dense.Ptr == 0 {
				grow += p.elements() * act
			}
		}
	}
	if grow == 0 {
		return nil
	}
	if ok, err := hasRoom(c, grow); !ok {
		return err
	}
	for l := range s.w.layers {
		for i := range s.w.layers[l].proj {
			p := &s.w.layers[l].proj[i]
			if p.dense.Ptr != 0 {
				continue
			}
			dense, err := s.alloc(c, p.elements()*act, "dense weights for decoding")
			if err != nil {
				return err
			}
			if _, err := s.weight(c, p, dense.Ptr); err != nil {
				return err
			}
			p.dense = dense
		}
	}
	return nil
}

// hasRoom reports whether the device can take grow more bytes and still
// keep densifyMargin free, once the allocator has handed its cached blocks
// back: the test of densify and tileNF4, whose copies only speed decoding.
func hasRoom(c *cuda.Ctx, grow int64) (bool, error) {
	if err := c.EmptyCache(); err != nil {
		return false, err
	}
	free, _, err := c.MemInfo()
	return err == nil && free >= grow+densifyMargin, err
}

// NF4TilesEnv names the switch of tileNF4: "auto" (the default) stores the
// copies where the device has the room, "off" never.
const NF4TilesEnv = "PIPELINE_NF4_TILES"

// tileNF4 gives every NF4 projection of a decoder a copy of its codes and
// absmax codes in the order decode_token and nf4_gemv_mma_tiled read them
// (kernels.NF4RepackTiles), where the device has the room: a warp then
// loads a 64-block's 16 rows as 512 contiguous bytes, where bitsandbytes'
// layout gives it 32 bytes from each row (trainer/gpu/NOTES.md, "the NF4
// phase alone"). The copy is half a byte a weight; training and the
// dequantisation keep reading the original.
func (s *session) tileNF4(c *cuda.Ctx) error {
	if mode, err := envSwitch(NF4TilesEnv, "auto", "off"); err != nil || mode == "off" {
		return err
	}
	if s.k.Prec != kernels.BF16 {
		return nil // neither reader runs in float32
	}
	var grow int64
	for l := range s.w.layers {
		for i := range s.w.layers[l].proj {
			p := &s.w.layers[l].proj[i]
			if !p.nf4 || p.in%64 != 0 {
				return nil
			}
			codes, absmax := kernels.NF4TileBytes(p.out, p.in)
			grow += codes + absmax
		}
	}
	if ok, err := hasRoom(c, grow); !ok {
		return err
	}
	for l := range s.w.layers {
		for i := range s.w.layers[l].proj {
			p := &s.w.layers[l].proj[i]
			codes, absmax := kernels.NF4TileBytes(p.out, p.in)
			b, err := s.alloc(c, codes+absmax, "NF4 weights in decoding order")
			if err != nil {
				return err
			}
			if err := s.k.NF4RepackTiles(c, p.packed.Ptr, p.absmaxQ.Ptr, p.out, p.in, b.Ptr, b.Ptr.Add(codes)); err != nil {
				return err
			}
			p.tiles = b
		}
	}
	return nil
}

// nf4Matrix is p's NF4 form for kernels.NF4GEMVPair, its product into out.
func (p *projection) nf4Matrix(out cuda.DevicePtr) kernels.NF4Matrix {
	tc, ta := p.tileParts()
	return kernels.NF4Matrix{Packed: p.packed.Ptr, AbsmaxQ: p.absmaxQ.Ptr, Absmax2: p.absmax2.Ptr, Offset: p.offset, Rows: p.out, Out: out,
		TileCodes: tc, TileAbsmaxQ: ta}
}

// tileParts are p.tiles' codes and absmax codes; 0, 0 without them.
func (p *projection) tileParts() (codes, absmaxQ cuda.DevicePtr) {
	if p.tiles.Ptr == 0 {
		return 0, 0
	}
	n, _ := kernels.NF4TileBytes(p.out, p.in)
	return p.tiles.Ptr, p.tiles.Ptr.Add(n)
}

// adjoin stores each layer's k and v weights, and its gate and up weights,
// one after the other in one buffer where both are dense and the device has
// the room for a pair twice over, so that linearPair computes each pair in
// one batched GEMM. Without the room a pair stays apart: slower, not
// refused.
func (s *session) adjoin(c *cuda.Ctx) error {
	size := s.k.Prec.Size()
	pairs := [][2]trainer.Module{{trainer.KProj, trainer.VProj}, {trainer.GateProj, trainer.UpProj}}
	for l := range s.w.layers {
		for _, pair := range pairs {
			p1, p2 := &s.w.layers[l].proj[moduleIndex(pair[0])], &s.w.layers[l].proj[moduleIndex(pair[1])]
			n1, n2 := p1.elements()*size, p2.elements()*size
			if p1.dense.Ptr == 0 || p2.dense.Ptr == 0 || p2.dense.Ptr == p1.dense.Ptr.Add(n1) {
				continue
			}
			free, _, err := c.MemInfo()
			if err != nil || free < 2*(n1+n2)+densifyMargin {
				return err
			}
			both, err := s.alloc(c, n1+n2, "paired weights for decoding")
			if err != nil {
				return err
			}
			if err := c.CopyDtoDAsync(both.Ptr, p1.dense.Ptr, n1, c.Stream()); err != nil {
				return err
			}
			if err := c.CopyDtoDAsync(both.Ptr.Add(n1), p2.dense.Ptr, n2, c.Stream()); err != nil {
				return err
			}
			for _, b := range []cuda.Buffer{p1.dense, p2.dense} {
				if err := s.release(c, b); err != nil {
					return err
				}
			}
			p1.dense = cuda.Buffer{Ptr: both.Ptr, Size: n1}
			p2.dense = cuda.Buffer{Ptr: both.Ptr.Add(n1), Size: n2}
		}
	}
	return c.EmptyCache()
}

// release frees a buffer the session owns before the session ends.
func (s *session) release(c *cuda.Ctx, b cuda.Buffer) error {
	for i, o := range s.owned {
		if o.Ptr == b.Ptr {
			s.owned = append(s.owned[:i], s.owned[i+1:]...)
			return c.Free(b)
		}
	}
	return fmt.Errorf("gpu: releasing a buffer the session does not own")
}

// alloc allocates n bytes that live as long as the session, turning an
// out-of-memory into an error that says what did not fit.
func (s *session) alloc(c *cuda.Ctx, n int64, what string) (cuda.Buffer, error) {
	b, err := c.AllocWhole(n)
	if err != nil {
		return b, s.oom(c, err, what)
	}
	s.owned = append(s.owned, b)
	return b, nil
}

func (s *session) oom(c *cuda.Ctx, err error, what string) error {
	free, total, _ := c.MemInfo()
	return fmt.Errorf("GPU out of memory allocating %s (%.2f GiB free of %.2f GiB; the session planned %.2f GiB): %w; "+
		"lower batch_size or the packed seq_len, keep gradient_checkpointing on, or use a smaller model",
		what, gib(free), gib(total), gib(s.plan.Total()), err)
}

func gib(b int64) float64 { return float64(b) / (1 << 30) }
