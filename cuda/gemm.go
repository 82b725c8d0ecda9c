package cuda

import (
	"fmt"
	"math/bits"
	"unsafe"
)

// DType is an element type of a GEMM operand.
type DType int

const (
	F32  DType = iota // float32
	BF16              // bfloat16
)

func (d DType) String() string {
	switch d {
	case F32:
		return "f32"
	case BF16:
		return "bf16"
	}
	return fmt.Sprintf("DType(%d)", int(d))
}

// Size returns the element size in bytes.
func (d DType) Size() int {
	if d == BF16 {
		return 2
	}
	return 4
}

// cudaDataType values.
func (d DType) cudaType() int32 {
	if d == BF16 {
		return 14 // CUDA_R_16BF
	}
	return 0 // CUDA_R_32F
}

// GEMM describes C = alpha·op(A)·op(B) + beta·C on row-major matrices,
// accumulated in float32. op(A) is M×K and op(B) is K×N; with TransA, A is
// stored K×M, with TransB, B is stored N×K. Leading dimensions are row
// strides in elements (0: tight). With Batch > 1, the matrices repeat at
// the given strides in elements (0: tight).
type GEMM struct {
	M, N, K                   int
	TransA, TransB            bool
	AType, BType, CType       DType
	LDA, LDB, LDC             int
	Batch                     int
	StrideA, StrideB, StrideC int64
	// SharedA, with Batch > 1, has every product read the one A (a batch
	// stride of 0): several weights applied to the same input.
	SharedA bool
}

func (g GEMM) String() string {
	s := fmt.Sprintf("%dx%dx%d %s·%s→%s", g.M, g.N, g.K, g.AType, g.BType, g.CType)
	if g.TransA {
		s += " Aᵀ"
	}
	if g.TransB {
		s += " Bᵀ"
	}
	if g.Batch > 1 {
		s += fmt.Sprintf(" batch %d", g.Batch)
		if g.SharedA {
			s += " shared A"
		}
	}
	return s
}

// Normalized fills in tight leading dimensions and strides and checks the
// description.
func (g GEMM) Normalized() (GEMM, error) {
	if g.M <= 0 || g.N <= 0 || g.K <= 0 {
		return g, fmt.Errorf("cuda: GEMM %s: sizes must be positive", g)
	}
	if g.AType != g.BType {
		return g, fmt.Errorf("cuda: GEMM %s: A and B must have the same type", g)
	}
	if g.AType == F32 && g.CType != F32 {
		return g, fmt.Errorf("cuda: GEMM %s: float32 inputs need a float32 output", g)
	}
	rowsA, colsA := g.M, g.K
	if g.TransA {
		rowsA, colsA = g.K, g.M
	}
	rowsB, colsB := g.K, g.N
	if g.TransB {
		rowsB, colsB = g.N, g.K
	}
	if g.LDA == 0 {
		g.LDA = colsA
	}
	if g.LDB == 0 {
		g.LDB = colsB
	}
	if g.LDC == 0 {
		g.LDC = g.N
	}
	if g.LDA < colsA || g.LDB < colsB || g.LDC < g.N {
		return g, fmt.Errorf("cuda: GEMM %s: leading dimensions (%d, %d, %d) smaller than rows (%d, %d, %d)",
			g, g.LDA, g.LDB, g.LDC, colsA, colsB, g.N)
	}
	if g.Batch <= 1 {
		g.Batch, g.StrideA, g.StrideB, g.StrideC, g.SharedA = 1, 0, 0, 0, false
	} else {
		if g.SharedA {
			g.StrideA = 0
		} else if g.StrideA == 0 {
			g.StrideA = int64(rowsA) * int64(g.LDA)
		}
		if g.StrideB == 0 {
			g.StrideB = int64(rowsB) * int64(g.LDB)
		}
		if g.StrideC == 0 {
			g.StrideC = int64(g.M) * int64(g.LDC)
		}
	}
	return g, nil
}

// cuBLASLt enumerations used here.
const (
	computeF32        = 68 // CUBLAS_COMPUTE_32F
	descTransA        = 3  // CUBLASLT_MATMUL_DESC_TRANSA
	descTransB        = 4  // CUBLASLT_MATMUL_DESC_TRANSB
	layoutBatchCount  = 5  // CUBLASLT_MATRIX_LAYOUT_BATCH_COUNT
	layoutBatchStride = 6  // CUBLASLT_MATRIX_LAYOUT_STRIDED_BATCH_OFFSET
	prefMaxWorkspace  = 1  // CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES
	prefAlignA        = 5  // CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, then B, C, D
	heuristicSize     = 96 // sizeof(cublasLtMatmulHeuristicResult_t)
)

// WorkspaceBytes is the cuBLASLt workspace each context keeps; Hopper's
// fastest kernels want 32 MiB.
const WorkspaceBytes = 32 << 20

type planKey struct {
	g                      GEMM
	alignA, alignB, alignC uint32
}

// gemmPlan is a GEMM's descriptors and the algorithm the heuristic chose.
type gemmPlan struct {
	desc, layoutA, layoutB, layoutC uintptr
	heuristic                       [heuristicSize]byte // algo is the first 64 bytes
	// candidates, when tuning (SetGEMMTuning), are the heuristic's first
	// choices in its order, timed on the plan's first use outside a graph
	// capture; heuristic is then the fastest.
	candidates [][heuristicSize]byte
}

type blasState struct {
	handle      uintptr
	workspace   Buffer
	plans       map[planKey]*gemmPlan
	alpha, beta float32 // host scalars, kept off the Go stack
	tune        gemmTuning
}

// alignment is the largest power of two dividing p, capped at 256 bytes:
// cuBLASLt's kernels pick vector widths from it.
func alignment(p DevicePtr) uint32 {
	if p == 0 {
		return 256
	}
	return uint32(min(256, 1<<bits.TrailingZeros64(uint64(p))))
}

func (c *Ctx) blasCheck(call string, r uintptr, g GEMM) error {
	if s := BLASStatus(int32(r)); s != 0 {
		return &BLASError{Call: call, Status: s, Detail: g.String()}
	}
	return nil
}

func (c *Ctx) blasInit() error {
	if c.blas != nil {
		return nil
	}
	lt := &c.libs.lt
	b := &blasState{plans: map[planKey]*gemmPlan{}}
	if err := c.blasCheck("cublasLtCreate", lt.cublasLtCreate.call(uintptr(unsafe.Pointer(&b.handle))), GEMM{}); err != nil {
		return err
	}
	ws, err := c.Alloc(WorkspaceBytes)
	if err != nil {
		lt.cublasLtDestroy.call(b.handle)
		return err
	}
	b.workspace = ws
	c.blas = b
	return nil
}

func (b *blasState) destroy(c *Ctx) {
	lt := &c.libs.lt
	for _, p := range b.plans {
		p.release(lt)
	}
	lt.cublasLtDestroy.call(b.handle)
}

func (p *gemmPlan) release(lt *blasLtAPI) {
	for _, l := range []uintptr{p.layoutA, p.layoutB, p.layoutC} {
		if l != 0 {
			lt.cublasLtMatrixLayoutDestroy.call(l)
		}
	}
	if p.desc != 0 {
		lt.cublasLtMatmulDescDestroy.call(p.desc)
	}
}

// plan builds (or finds) the descriptors for a normalized GEMM. cuBLASLt is
// column-major; a row-major C = op(A)·op(B) is the column-major
// Cᵀ = op(B)ᵀ·op(A)ᵀ, so B's buffer is passed as cuBLASLt's A and A's as
// its B, each with its own transpose flag, and the sizes swap M and N.
func (c *Ctx) plan(key planKey) (*gemmPlan, error) {
	if p, ok := c.blas.plans[key]; ok {
		return p, nil
	}
	g := key.g
	lt := &c.libs.lt
	p := &gemmPlan{}
	fail := func(err error) (*gemmPlan, error) {
		p.release(lt)
		return nil, err
	}
	if err := c.blasCheck("cublasLtMatmulDescCreate",
		lt.cublasLtMatmulDescCreate.call(uintptr(unsafe.Pointer(&p.desc)), computeF32, uintptr(F32.cudaType())), g); err != nil {
		return fail(err)
	}
	setDesc := func(attr int, v int32) error {
		return c.blasCheck("cublasLtMatmulDescSetAttribute",
			lt.cublasLtMatmulDescSetAttribute.call(p.desc, uintptr(attr), uintptr(unsafe.Pointer(&v)), 4), g)
	}
	if err := setDesc(descTransA, boolOp(g.TransB)); err != nil {
		return fail(err)
	}
	if err := setDesc(descTransB, boolOp(g.TransA)); err != nil {
		return fail(err)
	}
	// cuBLASLt's A is our B: column-major N×K (or K×N when transposed).
	rowsA, colsA := g.N, g.K
	if g.TransB {
		rowsA, colsA = g.K, g.N
	}
	rowsB, colsB := g.K, g.M
	if g.TransA {
		rowsB, colsB = g.M, g.K
	}
	layouts := []struct {
		dst        *uintptr
		t          DType
		rows, cols int
		ld         int
		stride     int64
	}{
		{&p.layoutA, g.BType, rowsA, colsA, g.LDB, g.StrideB},
		{&p.layoutB, g.AType, rowsB, colsB, g.LDA, g.StrideA},
		{&p.layoutC, g.CType, g.N, g.M, g.LDC, g.StrideC},
	}
	for _, l := range layouts {
		if err := c.blasCheck("cublasLtMatrixLayoutCreate", lt.cublasLtMatrixLayoutCreate.call(
			uintptr(unsafe.Pointer(l.dst)), uintptr(l.t.cudaType()), uintptr(l.rows), uintptr(l.cols), uintptr(l.ld)), g); err != nil {
			return fail(err)
		}
		if g.Batch > 1 {
			count, stride := int32(g.Batch), l.stride
			if err := c.blasCheck("cublasLtMatrixLayoutSetAttribute", lt.cublasLtMatrixLayoutSetAttribute.call(
				*l.dst, layoutBatchCount, uintptr(unsafe.Pointer(&count)), 4), g); err != nil {
				return fail(err)
			}
			if err := c.blasCheck("cublasLtMatrixLayoutSetAttribute", lt.cublasLtMatrixLayoutSetAttribute.call(
				*l.dst, layoutBatchStride, uintptr(unsafe.Pointer(&stride)), 8), g); err != nil {
				return fail(err)
			}
		}
	}
	var pref uintptr
	if err := c.blasCheck("cublasLtMatmulPreferenceCreate", lt.cublasLtMatmulPreferenceCreate.call(uintptr(unsafe.Pointer(&pref))), g); err != nil {
		return fail(err)
	}
	defer lt.cublasLtMatmulPreferenceDestroy.call(pref)
	ws := uint64(WorkspaceBytes)
	if err := c.blasCheck("cublasLtMatmulPreferenceSetAttribute", lt.cublasLtMatmulPreferenceSetAttribute.call(
		pref, prefMaxWorkspace, uintptr(unsafe.Pointer(&ws)), 8), g); err != nil {
		return fail(err)
	}
	// Our A and B swap places in cuBLASLt's call; C and D share a buffer.
	for i, a := range []uint32{key.alignB, key.alignA, key.alignC, key.alignC} {
		if err := c.blasCheck("cublasLtMatmulPreferenceSetAttribute", lt.cublasLtMatmulPreferenceSetAttribute.call(
			pref, uintptr(prefAlignA+i), uintptr(unsafe.Pointer(&a)), 4), g); err != nil {
			return fail(err)
		}
	}
	want := max(c.blas.tune.candidates, 1)
	results := make([][heuristicSize]byte, want)
	var returned int32
	if err := c.blasCheck("cublasLtMatmulAlgoGetHeuristic", lt.cublasLtMatmulAlgoGetHeuristic.call(
		c.blas.handle, p.desc, p.layoutA, p.layoutB, p.layoutC, p.layoutC, pref, uintptr(want),
		uintptr(unsafe.Pointer(&results[0][0])), uintptr(unsafe.Pointer(&returned))), g); err != nil {
		return fail(err)
	}
	if returned == 0 {
		return fail(&BLASError{Call: "cublasLtMatmulAlgoGetHeuristic", Status: 15, Detail: g.String() + ": no algorithm"})
	}
	p.heuristic = results[0]
	if returned > 1 {
		p.candidates = results[:returned]
	}
	c.blas.plans[key] = p
	return p, nil
}

func boolOp(t bool) int32 {
	if t {
		return 1 // CUBLAS_OP_T
	}
	return 0 // CUBLAS_OP_N
}

// Matmul computes out = alpha·op(A)·op(B) + beta·out as g describes, on s
// (nil: the working stream). The first call for a shape and alignment asks
// cuBLASLt's heuristic for an algorithm; later calls reuse it.
func (c *Ctx) Matmul(g GEMM, alpha float32, a, b DevicePtr, beta float32, out DevicePtr, s *Stream) error {
	if err := c.check(); err != nil {
		return err
	}
	g, err := g.Normalized()
	if err != nil {
		return err
	}
	if err := c.blasInit(); err != nil {
		return err
	}
	p, err := c.plan(planKey{g: g, alignA: alignment(a), alignB: alignment(b), alignC: alignment(out)})
	if err != nil {
		return err
	}
	if p.candidates != nil && !c.capturing {
		if err := c.tuneGEMM(p, g, alpha, a, b, beta, out, s); err != nil {
			return err
		}
	}
	return c.matmul(p, g, &p.heuristic, alpha, a, b, beta, out, s)
}

// matmul queues one cuBLASLt call of plan p with algorithm algo.
func (c *Ctx) matmul(p *gemmPlan, g GEMM, algo *[heuristicSize]byte, alpha float32, a, b DevicePtr, beta float32, out DevicePtr, s *Stream) error {
	bs := c.blas
	bs.alpha, bs.beta = alpha, beta
	r := c.libs.lt.cublasLtMatmul.call(bs.handle, p.desc,
		uintptr(unsafe.Pointer(&bs.alpha)), uintptr(b), p.layoutA, uintptr(a), p.layoutB,
		uintptr(unsafe.Pointer(&bs.beta)), uintptr(out), p.layoutC, uintptr(out), p.layoutC,
		uintptr(unsafe.Pointer(&algo[0])), uintptr(bs.workspace.Ptr), WorkspaceBytes, c.streamOr(s).handle)
	return c.blasCheck("cublasLtMatmul", r, g)
}

// Elements returns how many elements the A, B and C buffers of a
// normalized GEMM span, batches included.
func (g GEMM) Elements() (a, b, c int64) {
	rowsA, rowsB := g.M, g.K
	if g.TransA {
		rowsA = g.K
	}
	if g.TransB {
		rowsB = g.N
	}
	batch := int64(max(g.Batch, 1))
	a = (batch-1)*g.StrideA + int64(rowsA)*int64(g.LDA)
	b = (batch-1)*g.StrideB + int64(rowsB)*int64(g.LDB)
	c = (batch-1)*g.StrideC + int64(g.M)*int64(g.LDC)
	return a, b, c
}
