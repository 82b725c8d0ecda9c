package tokenizer

// mergeTable maps a pair of token ids to the merge's rank (its line in the
// merges list) and the id of the merged token.
type mergeTable map[uint64]uint64

func pairKey(left, right int32) uint64 { return uint64(uint32(left))<<32 | uint64(uint32(right)) }

func newMergeTable(merges [][3]int32) mergeTable {
	m := make(mergeTable, len(merges))
	for rank, mg := range merges {
		m[pairKey(mg[0], mg[1])] = uint64(rank)<<32 | uint64(uint32(mg[2]))
	}
	return m
}

func (m mergeTable) get(left, right int32) (rank uint32, merged int32, ok bool) {
	v, ok := m[pairKey(left, right)]
	return uint32(v >> 32), int32(uint32(v)), ok
}

// symbol is one token of a word while it is being merged; start and end
// are byte offsets in the input.
type symbol struct {
	id         int32
	prev, next int32
	start, end int32
	gone       bool
}

// candidate is a possible merge of the symbol at pos with its successor.
type candidate struct {
	rank   uint32
	pos    int32
	merged int32
}

func (a candidate) before(b candidate) bool {
	return a.rank < b.rank || (a.rank == b.rank && a.pos < b.pos)
}

// mergeHeap is a binary min-heap of candidates by (rank, position).
type mergeHeap []candidate

func (h *mergeHeap) push(c candidate) {
	*h = append(*h, c)
	q := *h
	i := len(q) - 1
	for i > 0 {
		p := (i - 1) / 2
		if !q[i].before(q[p]) {
			break
		}
		q[i], q[p] = q[p], q[i]
		i = p
	}
}

func (h *mergeHeap) pop() candidate {
	q := *h
	top := q[0]
	last := len(q) - 1
	q[0] = q[last]
	q = q[:last]
	i := 0
	for {
		l := 2*i + 1
		if l >= len(q) {
			break
		}
		m := l
		if r := l + 1; r < len(q) && q[r].before(q[l]) {
			m = r
		}
		if !q[m].before(q[i]) {
			break
		}
		q[i], q[m] = q[m], q[i]
		i = m
	}
	*h = q
	return top
}

// mergeAll applies the merges to syms the way Hugging Face's BPE does:
// always the lowest-ranked pair, leftmost first, with stale candidates
// recognised by the merged id they were queued with. Reproducing that exact
// procedure (not just "BPE") keeps even the rare vocabularies where two
// pairs make the same token giving identical ids.
func (m mergeTable) mergeAll(syms []symbol, heap *mergeHeap) {
	h := (*heap)[:0]
	for i := 0; i+1 < len(syms); i++ {
		if rank, merged, ok := m.get(syms[i].id, syms[i+1].id); ok {
			h.push(candidate{rank, int32(i), merged})
		}
	}
	for len(h) > 0 {
		top := h.pop()
		cur := &syms[top.pos]
		if cur.gone || cur.next < 0 {
			continue
		}
		nextPos := cur.next
		right := syms[nextPos]
		if _, merged, ok := m.get(cur.id, right.id); !ok || merged != top.merged {
			continue
		}
		cur.id = top.merged
		cur.end = right.end
		cur.next = right.next
		syms[nextPos].gone = true
		if right.next >= 0 && int(right.next) < len(syms) {
			syms[right.next].prev = top.pos
		}
		if cur.prev >= 0 {
			if rank, merged, ok := m.get(syms[cur.prev].id, cur.id); ok {
				h.push(candidate{rank, cur.prev, merged})
			}
		}
		if cur.next >= 0 && int(cur.next) < len(syms) {
			if rank, merged, ok := m.get(cur.id, syms[cur.next].id); ok {
				h.push(candidate{rank, top.pos, merged})
			}
		}
	}
	*heap = h
}
