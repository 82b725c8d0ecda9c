package packer

import "math/bits"

// bestFitDecreasing places the examples, in the given order (longest
// first), each into the open bin whose remaining capacity is the smallest
// that still fits it, the lowest-numbered such bin on a tie, or into a new bin
// when none fits. It returns each example's bin and the number of bins.
//
// Bins are indexed by remaining capacity, so each placement costs a lookup
// in a two-level bitmap plus a heap operation instead of a scan of all bins.
func bestFitDecreasing(lengths []int32, order []int32, capacity int) (binOf []int32, bins int) {
	binOf = make([]int32, len(lengths))
	idx := newCapacityIndex(capacity)
	for _, ex := range order {
		n := int(lengths[ex])
		c := idx.ceil(n)
		var b int32
		if c < 0 {
			b = int32(bins)
			bins++
			c = capacity
		} else {
			b = idx.pop(c)
		}
		binOf[ex] = b
		if rest := c - n; rest > 0 {
			idx.push(rest, b)
		}
	}
	return binOf, bins
}

// capacityIndex holds the open bins keyed by remaining capacity: a bitmap of
// the capacities that have bins, a summary bitmap of its non-zero words, and
// per capacity a min-heap of bin numbers.
type capacityIndex struct {
	words   []uint64
	summary []uint64
	heaps   [][]int32
}

func newCapacityIndex(capacity int) *capacityIndex {
	nw := capacity/64 + 1
	return &capacityIndex{
		words:   make([]uint64, nw),
		summary: make([]uint64, nw/64+1),
		heaps:   make([][]int32, capacity+1),
	}
}

// ceil returns the smallest capacity >= n that has a bin, or -1.
func (x *capacityIndex) ceil(n int) int {
	w := n / 64
	if w >= len(x.words) {
		return -1
	}
	if m := x.words[w] & (^uint64(0) << (n % 64)); m != 0 {
		return w*64 + bits.TrailingZeros64(m)
	}
	w++
	s := w / 64
	if s >= len(x.summary) {
		return -1
	}
	m := x.summary[s] & (^uint64(0) << (w % 64))
	for m == 0 {
		s++
		if s >= len(x.summary) {
			return -1
		}
		m = x.summary[s]
	}
	w = s*64 + bits.TrailingZeros64(m)
	return w*64 + bits.TrailingZeros64(x.words[w])
}

func (x *capacityIndex) push(c int, bin int32) {
	h := append(x.heaps[c], bin)
	for i := len(h) - 1; i > 0; {
		parent := (i - 1) / 2
		if h[parent] <= h[i] {
			break
		}
		h[parent], h[i] = h[i], h[parent]
		i = parent
	}
	x.heaps[c] = h
	x.words[c/64] |= 1 << (c % 64)
	x.summary[c/64/64] |= 1 << (c / 64 % 64)
}

// pop removes and returns the lowest-numbered bin of capacity c.
func (x *capacityIndex) pop(c int) int32 {
	h := x.heaps[c]
	top := h[0]
	last := len(h) - 1
	h[0] = h[last]
	h = h[:last]
	for i := 0; ; {
		least := i
		if l := 2*i + 1; l < len(h) && h[l] < h[least] {
			least = l
		}
		if r := 2*i + 2; r < len(h) && h[r] < h[least] {
			least = r
		}
		if least == i {
			break
		}
		h[i], h[least] = h[least], h[i]
		i = least
	}
	x.heaps[c] = h
	if len(h) == 0 {
		x.words[c/64] &^= 1 << (c % 64)
		if x.words[c/64] == 0 {
			x.summary[c/64/64] &^= 1 << (c / 64 % 64)
		}
	}
	return top
}
