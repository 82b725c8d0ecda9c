#include "textflag.h"

// func dotStrip2x4(x0, x1, w *float32, k, n int, out0, out1 *float32)
// For rows r = 0, 4, 8, ... < n (n a multiple of 4) of w (row stride k
// floats, k a multiple of 8): out0[r+j] = x0·w[r+j], out1[r+j] = x1·w[r+j].
TEXT ·dotStrip2x4(SB), NOSPLIT, $0-56
	MOVQ x0+0(FP), SI
	MOVQ x1+8(FP), DI
	MOVQ w+16(FP), R8
	MOVQ k+24(FP), CX
	MOVQ n+32(FP), DX
	MOVQ out0+40(FP), R12
	MOVQ out1+48(FP), R13
	SHLQ $2, CX

rowloop:
	CMPQ DX, $4
	JL   done
	LEAQ (R8)(CX*1), R9
	LEAQ (R9)(CX*1), R10
	LEAQ (R10)(CX*1), R11
	VXORPS Y0, Y0, Y0
	VXORPS Y1, Y1, Y1
	VXORPS Y2, Y2, Y2
	VXORPS Y3, Y3, Y3
	VXORPS Y4, Y4, Y4
	VXORPS Y5, Y5, Y5
	VXORPS Y6, Y6, Y6
	VXORPS Y7, Y7, Y7
	XORQ BX, BX

kloop:
	VMOVUPS (SI)(BX*1), Y8
	VMOVUPS (DI)(BX*1), Y9
	VMOVUPS (R8)(BX*1), Y10
	VFMADD231PS Y8, Y10, Y0
	VFMADD231PS Y9, Y10, Y4
	VMOVUPS (R9)(BX*1), Y11
	VFMADD231PS Y8, Y11, Y1
	VFMADD231PS Y9, Y11, Y5
	VMOVUPS (R10)(BX*1), Y12
	VFMADD231PS Y8, Y12, Y2
	VFMADD231PS Y9, Y12, Y6
	VMOVUPS (R11)(BX*1), Y13
	VFMADD231PS Y8, Y13, Y3
	VFMADD231PS Y9, Y13, Y7
	ADDQ $32, BX
	CMPQ BX, CX
	JL   kloop

	// Horizontal sums: (Y0, Y1, Y2, Y3) -> four floats for out0.
	VHADDPS Y1, Y0, Y0
	VHADDPS Y3, Y2, Y2
	VHADDPS Y2, Y0, Y0
	VEXTRACTF128 $1, Y0, X1
	VADDPS X1, X0, X0
	VMOVUPS X0, (R12)
	VHADDPS Y5, Y4, Y4
	VHADDPS Y7, Y6, Y6
	VHADDPS Y6, Y4, Y4
	VEXTRACTF128 $1, Y4, X5
	VADDPS X5, X4, X4
	VMOVUPS X4, (R13)

	LEAQ (R11)(CX*1), R8
	ADDQ $16, R12
	ADDQ $16, R13
	SUBQ $4, DX
	JMP  rowloop

done:
	VZEROUPPER
	RET

// func axpyRows64(grad, e *float32, k, n int, acc *float32)
// acc[0:k] += sum over v < n, in order, of grad[v] * e[v*k : v*k+k]; k is a
// multiple of 64.
TEXT ·axpyRows64(SB), NOSPLIT, $0-40
	MOVQ grad+0(FP), SI
	MOVQ e+8(FP), DI
	MOVQ k+16(FP), CX
	MOVQ n+24(FP), DX
	MOVQ acc+32(FP), R8
	SHLQ $2, CX
	XORQ R9, R9

kcloop:
	CMPQ R9, CX
	JGE  adone
	LEAQ (R8)(R9*1), R13
	VMOVUPS 0(R13), Y0
	VMOVUPS 32(R13), Y1
	VMOVUPS 64(R13), Y2
	VMOVUPS 96(R13), Y3
	VMOVUPS 128(R13), Y4
	VMOVUPS 160(R13), Y5
	VMOVUPS 192(R13), Y6
	VMOVUPS 224(R13), Y7
	LEAQ (DI)(R9*1), R10
	MOVQ SI, R11
	MOVQ DX, R12

vloop:
	TESTQ R12, R12
	JZ    vdone
	VBROADCASTSS (R11), Y8
	VFMADD231PS 0(R10), Y8, Y0
	VFMADD231PS 32(R10), Y8, Y1
	VFMADD231PS 64(R10), Y8, Y2
	VFMADD231PS 96(R10), Y8, Y3
	VFMADD231PS 128(R10), Y8, Y4
	VFMADD231PS 160(R10), Y8, Y5
	VFMADD231PS 192(R10), Y8, Y6
	VFMADD231PS 224(R10), Y8, Y7
	ADDQ CX, R10
	ADDQ $4, R11
	DECQ R12
	JMP  vloop

vdone:
	VMOVUPS Y0, 0(R13)
	VMOVUPS Y1, 32(R13)
	VMOVUPS Y2, 64(R13)
	VMOVUPS Y3, 96(R13)
	VMOVUPS Y4, 128(R13)
	VMOVUPS Y5, 160(R13)
	VMOVUPS Y6, 192(R13)
	VMOVUPS Y7, 224(R13)
	ADDQ $256, R9
	JMP  kcloop

adone:
	VZEROUPPER
	RET

// Constants of expBlock: Cephes' single-precision exp (range reduction by
// ln 2 split in two parts, degree-5 polynomial), accurate to about 1 ulp.
DATA expc<>+0(SB)/4, $0x3fb8aa3b  // log2(e)
DATA expc<>+4(SB)/4, $0x3f318000  // ln 2, high part
DATA expc<>+8(SB)/4, $0xb95e8083  // ln 2, low part (negative)
DATA expc<>+12(SB)/4, $0x39506967 // 1.9875691500e-4
DATA expc<>+16(SB)/4, $0x3ab743ce // 1.3981999507e-3
DATA expc<>+20(SB)/4, $0x3c088908 // 8.3334519073e-3
DATA expc<>+24(SB)/4, $0x3d2aa9c1 // 4.1665795894e-2
DATA expc<>+28(SB)/4, $0x3e2aaaaa // 1.6666665459e-1
DATA expc<>+32(SB)/4, $0x3f000000 // 0.5
DATA expc<>+36(SB)/4, $0x3f800000 // 1
DATA expc<>+40(SB)/4, $0xc2a00000 // -80: inputs are clamped here
GLOBL expc<>(SB), RODATA|NOPTR, $44

// func expBlock(x *float32, n int, shift float32) float32
// x[i] = exp(max(x[i] - shift, -80)) for i < n (n a multiple of 8); returns
// the float32 sum of the new values.
TEXT ·expBlock(SB), NOSPLIT, $0-28
	MOVQ x+0(FP), SI
	MOVQ n+8(FP), CX
	VBROADCASTSS shift+16(FP), Y15
	VBROADCASTSS expc<>+0(SB), Y14
	VBROADCASTSS expc<>+4(SB), Y13
	VBROADCASTSS expc<>+8(SB), Y12
	VBROADCASTSS expc<>+40(SB), Y11
	VBROADCASTSS expc<>+36(SB), Y10
	VXORPS Y9, Y9, Y9

eloop:
	CMPQ CX, $8
	JL   edone
	VMOVUPS (SI), Y0
	VSUBPS Y15, Y0, Y0
	VMAXPS Y11, Y0, Y0
	VMULPS Y14, Y0, Y1
	VROUNDPS $0, Y1, Y1
	VFNMADD231PS Y13, Y1, Y0
	VFNMADD231PS Y12, Y1, Y0
	VBROADCASTSS expc<>+12(SB), Y2
	VBROADCASTSS expc<>+16(SB), Y3
	VFMADD213PS Y3, Y0, Y2
	VBROADCASTSS expc<>+20(SB), Y3
	VFMADD213PS Y3, Y0, Y2
	VBROADCASTSS expc<>+24(SB), Y3
	VFMADD213PS Y3, Y0, Y2
	VBROADCASTSS expc<>+28(SB), Y3
	VFMADD213PS Y3, Y0, Y2
	VBROADCASTSS expc<>+32(SB), Y3
	VFMADD213PS Y3, Y0, Y2
	VMULPS Y0, Y0, Y4
	VFMADD213PS Y0, Y4, Y2
	VADDPS Y10, Y2, Y2
	VCVTPS2DQ Y1, Y5
	VPSLLD $23, Y5, Y5
	VPADDD Y5, Y2, Y2
	VMOVUPS Y2, (SI)
	VADDPS Y2, Y9, Y9
	ADDQ $32, SI
	SUBQ $8, CX
	JMP  eloop

edone:
	VEXTRACTF128 $1, Y9, X0
	VADDPS X0, X9, X0
	VHADDPS X0, X0, X0
	VHADDPS X0, X0, X0
	VZEROUPPER
	MOVSS X0, ret+24(FP)
	RET
