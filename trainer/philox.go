package trainer

import (
	"math"
	"math/bits"
)

// Philox4x32-10 (Salmon et al., "Parallel random numbers: as easy as 1, 2,
// 3", SC 2011) is a counter-based generator: the output for a counter and a
// key depends on nothing else, so any element of a random stream can be
// computed on its own. The CPU reference and the GPU kernels
// (trainer/gpu/kernels/random.cuh) draw dropout masks with it, so both
// backends drop exactly the same elements.

const (
	philoxM0 = 0xD2511F53
	philoxM1 = 0xCD9E8D57
	philoxW0 = 0x9E3779B9
	philoxW1 = 0xBB67AE85
)

// Philox4x32 returns the ten-round Philox4x32 output for counter ctr and
// key key.
func Philox4x32(ctr [4]uint32, key [2]uint32) [4]uint32 {
	for r := 0; r < 10; r++ {
		if r > 0 {
			key[0] += philoxW0
			key[1] += philoxW1
		}
		hi0, lo0 := bits.Mul32(philoxM0, ctr[0])
		hi1, lo1 := bits.Mul32(philoxM1, ctr[2])
		ctr = [4]uint32{hi1 ^ ctr[1] ^ key[0], lo1, hi0 ^ ctr[3] ^ key[1], lo0}
	}
	return ctr
}

// RandomBits is word i of the random stream (seed, stream): counter
// (i/4 as 64 bits, stream, 0), key seed, word i%4 of the output.
func RandomBits(seed uint64, stream uint32, i uint64) uint32 {
	out := Philox4x32([4]uint32{uint32(i >> 2), uint32(i >> 34), stream, 0}, [2]uint32{uint32(seed), uint32(seed >> 32)})
	return out[i&3]
}

// Dropout keeps element i of stream (seed, stream) when its 16 random bits,
// half i%2 of word i/2 (the low half first), are at least Threshold: with
// probability 1 - p, p rounded to the nearest multiple of 2^-16. Sixteen
// bits an element let one Philox call serve eight elements; the GPU's
// dropout is bound by the draws. Kept elements are multiplied by Scale.
type Dropout struct {
	Seed      uint64
	Threshold uint32
	Scale     float32
}

// NewDropout returns the dropout with probability p drawn from seed.
func NewDropout(p float64, seed uint64) Dropout {
	return Dropout{Seed: seed, Threshold: uint32(math.Round(p * (1 << 16))), Scale: float32(1 / (1 - p))}
}

// DropoutStream names the random stream of one LoRA projection's dropout.
func DropoutStream(layer int, m Module) uint32 { return uint32(layer)<<8 | uint32(moduleIndex(m)) }

// Keep reports whether element i of stream is kept.
func (d Dropout) Keep(stream uint32, i uint64) bool {
	return RandomBits(d.Seed, stream, i>>1)>>(16*(i&1))&0xffff >= d.Threshold
}
