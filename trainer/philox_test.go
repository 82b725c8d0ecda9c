package trainer

import "testing"

// Known answers of Philox4x32-10 from Random123's kat_vectors.
func TestPhiloxKnownAnswers(t *testing.T) {
	cases := []struct {
		ctr  [4]uint32
		key  [2]uint32
		want [4]uint32
	}{
		{[4]uint32{0, 0, 0, 0}, [2]uint32{0, 0}, [4]uint32{0x6627e8d5, 0xe169c58d, 0xbc57ac4c, 0x9b00dbd8}},
		{[4]uint32{0xffffffff, 0xffffffff, 0xffffffff, 0xffffffff}, [2]uint32{0xffffffff, 0xffffffff}, [4]uint32{0x408f276d, 0x41c83b0e, 0xa20bc7c6, 0x6d5451fd}},
		{[4]uint32{0x243f6a88, 0x85a308d3, 0x13198a2e, 0x03707344}, [2]uint32{0xa4093822, 0x299f31d0}, [4]uint32{0xd16cfe09, 0x94fdcceb, 0x5001e420, 0x24126ea1}},
	}
	for _, c := range cases {
		if got := Philox4x32(c.ctr, c.key); got != c.want {
			t.Errorf("philox(%x, %x) = %x, want %x", c.ctr, c.key, got, c.want)
		}
	}
}

// TestDropoutRate checks that dropout keeps about 1 - p of the elements and
// that distinct streams and seeds give distinct masks.
func TestDropoutRate(t *testing.T) {
	d := NewDropout(0.25, 42)
	const n = 200000
	kept := 0
	same := 0
	other := NewDropout(0.25, 43)
	for i := uint64(0); i < n; i++ {
		k := d.Keep(7, i)
		if k {
			kept++
		}
		if k == d.Keep(8, i) && k == other.Keep(7, i) {
			same++
		}
	}
	if f := float64(kept) / n; f < 0.745 || f > 0.755 {
		t.Errorf("kept %.4f of the elements, want 0.75", f)
	}
	// Independent masks agree on an element with probability 0.75³ + 0.25³.
	if f := float64(same) / n; f < 0.42 || f > 0.45 {
		t.Errorf("three masks agree on %.4f of the elements: not independent", f)
	}
}
