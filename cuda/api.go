package cuda

// The C entry points this package uses, bound by name at load time. The
// _v2 names are the ones cuda.h maps the plain names to.

type driverAPI struct {
	cuInit, cuDriverGetVersion, cuGetErrorName, cuGetErrorString                cfunc
	cuDeviceGetCount, cuDeviceGet, cuDeviceGetName, cuDeviceTotalMem            cfunc
	cuDeviceGetAttribute, cuDevicePrimaryCtxRetain, cuDevicePrimaryCtxRelease   cfunc
	cuCtxSetCurrent, cuCtxSynchronize, cuMemGetInfo                             cfunc
	cuMemAlloc, cuMemFree, cuMemHostAlloc, cuMemFreeHost                        cfunc
	cuMemHostGetDevicePointer                                                   cfunc
	cuMemcpyHtoD, cuMemcpyDtoH, cuMemcpyHtoDAsync, cuMemcpyDtoHAsync            cfunc
	cuMemcpyDtoDAsync, cuMemsetD8Async, cuMemsetD32Async                        cfunc
	cuStreamCreate, cuStreamDestroy, cuStreamSynchronize                        cfunc
	cuEventCreate, cuEventDestroy, cuEventRecord, cuEventSynchronize            cfunc
	cuEventElapsedTime, cuStreamWaitEvent                                       cfunc
	cuModuleLoadData, cuModuleUnload, cuModuleGetFunction, cuLaunchKernel       cfunc
	cuLaunchCooperativeKernel, cuOccupancyMaxActiveBlocksPerMultiprocessor      cfunc
	cuFuncGetParamInfo, cuFuncGetParamCount, cuFuncSetAttribute                 cfunc
	cuFuncGetAttribute                                                          cfunc
	cuStreamBeginCapture, cuStreamEndCapture, cuGraphInstantiate, cuGraphLaunch cfunc
	cuGraphExecDestroy, cuGraphDestroy                                          cfunc
}

func (a *driverAPI) table() []symbol {
	return []symbol{
		{fn: &a.cuInit, name: "cuInit"},
		{fn: &a.cuDriverGetVersion, name: "cuDriverGetVersion"},
		{fn: &a.cuGetErrorName, name: "cuGetErrorName"},
		{fn: &a.cuGetErrorString, name: "cuGetErrorString"},
		{fn: &a.cuDeviceGetCount, name: "cuDeviceGetCount"},
		{fn: &a.cuDeviceGet, name: "cuDeviceGet"},
		{fn: &a.cuDeviceGetName, name: "cuDeviceGetName"},
		{fn: &a.cuDeviceTotalMem, name: "cuDeviceTotalMem_v2"},
		{fn: &a.cuDeviceGetAttribute, name: "cuDeviceGetAttribute"},
		{fn: &a.cuDevicePrimaryCtxRetain, name: "cuDevicePrimaryCtxRetain"},
		{fn: &a.cuDevicePrimaryCtxRelease, name: "cuDevicePrimaryCtxRelease_v2"},
		{fn: &a.cuCtxSetCurrent, name: "cuCtxSetCurrent"},
		{fn: &a.cuCtxSynchronize, name: "cuCtxSynchronize"},
		{fn: &a.cuMemGetInfo, name: "cuMemGetInfo_v2"},
		{fn: &a.cuMemAlloc, name: "cuMemAlloc_v2"},
		{fn: &a.cuMemFree, name: "cuMemFree_v2"},
		{fn: &a.cuMemHostAlloc, name: "cuMemHostAlloc"},
		{fn: &a.cuMemFreeHost, name: "cuMemFreeHost"},
		{fn: &a.cuMemHostGetDevicePointer, name: "cuMemHostGetDevicePointer_v2"},
		{fn: &a.cuMemcpyHtoD, name: "cuMemcpyHtoD_v2"},
		{fn: &a.cuMemcpyDtoH, name: "cuMemcpyDtoH_v2"},
		{fn: &a.cuMemcpyHtoDAsync, name: "cuMemcpyHtoDAsync_v2"},
		{fn: &a.cuMemcpyDtoHAsync, name: "cuMemcpyDtoHAsync_v2"},
		{fn: &a.cuMemcpyDtoDAsync, name: "cuMemcpyDtoDAsync_v2"},
		{fn: &a.cuMemsetD8Async, name: "cuMemsetD8Async"},
		{fn: &a.cuMemsetD32Async, name: "cuMemsetD32Async"},
		{fn: &a.cuStreamCreate, name: "cuStreamCreate"},
		{fn: &a.cuStreamDestroy, name: "cuStreamDestroy_v2"},
		{fn: &a.cuStreamSynchronize, name: "cuStreamSynchronize"},
		{fn: &a.cuStreamWaitEvent, name: "cuStreamWaitEvent"},
		{fn: &a.cuEventCreate, name: "cuEventCreate"},
		{fn: &a.cuEventDestroy, name: "cuEventDestroy_v2"},
		{fn: &a.cuEventRecord, name: "cuEventRecord"},
		{fn: &a.cuEventSynchronize, name: "cuEventSynchronize"},
		{fn: &a.cuEventElapsedTime, name: "cuEventElapsedTime_v2", alt: "cuEventElapsedTime"},
		{fn: &a.cuModuleLoadData, name: "cuModuleLoadData"},
		{fn: &a.cuModuleUnload, name: "cuModuleUnload"},
		{fn: &a.cuModuleGetFunction, name: "cuModuleGetFunction"},
		{fn: &a.cuLaunchKernel, name: "cuLaunchKernel"},
		{fn: &a.cuLaunchCooperativeKernel, name: "cuLaunchCooperativeKernel"},
		{fn: &a.cuOccupancyMaxActiveBlocksPerMultiprocessor, name: "cuOccupancyMaxActiveBlocksPerMultiprocessor"},
		{fn: &a.cuFuncGetParamInfo, name: "cuFuncGetParamInfo", optional: true},   // CUDA 12.4+
		{fn: &a.cuFuncGetParamCount, name: "cuFuncGetParamCount", optional: true}, // CUDA 13+
		{fn: &a.cuFuncSetAttribute, name: "cuFuncSetAttribute"},
		{fn: &a.cuFuncGetAttribute, name: "cuFuncGetAttribute"},
		{fn: &a.cuStreamBeginCapture, name: "cuStreamBeginCapture_v2"},
		{fn: &a.cuStreamEndCapture, name: "cuStreamEndCapture"},
		{fn: &a.cuGraphInstantiate, name: "cuGraphInstantiateWithFlags"},
		{fn: &a.cuGraphLaunch, name: "cuGraphLaunch"},
		{fn: &a.cuGraphExecDestroy, name: "cuGraphExecDestroy"},
		{fn: &a.cuGraphDestroy, name: "cuGraphDestroy"},
	}
}

type nvrtcAPI struct {
	nvrtcVersion, nvrtcGetErrorString, nvrtcCreateProgram, nvrtcDestroyProgram cfunc
	nvrtcCompileProgram, nvrtcGetProgramLogSize, nvrtcGetProgramLog            cfunc
	nvrtcGetCUBINSize, nvrtcGetCUBIN, nvrtcGetPTXSize, nvrtcGetPTX             cfunc
	nvrtcGetNumSupportedArchs, nvrtcGetSupportedArchs                          cfunc
}

func (a *nvrtcAPI) table() []symbol {
	return []symbol{
		{fn: &a.nvrtcVersion, name: "nvrtcVersion"},
		{fn: &a.nvrtcGetErrorString, name: "nvrtcGetErrorString"},
		{fn: &a.nvrtcCreateProgram, name: "nvrtcCreateProgram"},
		{fn: &a.nvrtcDestroyProgram, name: "nvrtcDestroyProgram"},
		{fn: &a.nvrtcCompileProgram, name: "nvrtcCompileProgram"},
		{fn: &a.nvrtcGetProgramLogSize, name: "nvrtcGetProgramLogSize"},
		{fn: &a.nvrtcGetProgramLog, name: "nvrtcGetProgramLog"},
		{fn: &a.nvrtcGetCUBINSize, name: "nvrtcGetCUBINSize"},
		{fn: &a.nvrtcGetCUBIN, name: "nvrtcGetCUBIN"},
		{fn: &a.nvrtcGetPTXSize, name: "nvrtcGetPTXSize"},
		{fn: &a.nvrtcGetPTX, name: "nvrtcGetPTX"},
		{fn: &a.nvrtcGetNumSupportedArchs, name: "nvrtcGetNumSupportedArchs"},
		{fn: &a.nvrtcGetSupportedArchs, name: "nvrtcGetSupportedArchs"},
	}
}

type blasLtAPI struct {
	cublasLtCreate, cublasLtDestroy, cublasLtGetVersion, cublasLtGetStatusName cfunc
	cublasLtMatmulDescCreate, cublasLtMatmulDescDestroy                        cfunc
	cublasLtMatmulDescSetAttribute, cublasLtMatrixLayoutCreate                 cfunc
	cublasLtMatrixLayoutDestroy, cublasLtMatrixLayoutSetAttribute              cfunc
	cublasLtMatmulPreferenceCreate, cublasLtMatmulPreferenceDestroy            cfunc
	cublasLtMatmulPreferenceSetAttribute, cublasLtMatmulAlgoGetHeuristic       cfunc
	cublasLtMatmul                                                             cfunc
}

func (a *blasLtAPI) table() []symbol {
	return []symbol{
		{fn: &a.cublasLtCreate, name: "cublasLtCreate"},
		{fn: &a.cublasLtDestroy, name: "cublasLtDestroy"},
		{fn: &a.cublasLtGetVersion, name: "cublasLtGetVersion"},
		{fn: &a.cublasLtGetStatusName, name: "cublasLtGetStatusName", optional: true},
		{fn: &a.cublasLtMatmulDescCreate, name: "cublasLtMatmulDescCreate"},
		{fn: &a.cublasLtMatmulDescDestroy, name: "cublasLtMatmulDescDestroy"},
		{fn: &a.cublasLtMatmulDescSetAttribute, name: "cublasLtMatmulDescSetAttribute"},
		{fn: &a.cublasLtMatrixLayoutCreate, name: "cublasLtMatrixLayoutCreate"},
		{fn: &a.cublasLtMatrixLayoutDestroy, name: "cublasLtMatrixLayoutDestroy"},
		{fn: &a.cublasLtMatrixLayoutSetAttribute, name: "cublasLtMatrixLayoutSetAttribute"},
		{fn: &a.cublasLtMatmulPreferenceCreate, name: "cublasLtMatmulPreferenceCreate"},
		{fn: &a.cublasLtMatmulPreferenceDestroy, name: "cublasLtMatmulPreferenceDestroy"},
		{fn: &a.cublasLtMatmulPreferenceSetAttribute, name: "cublasLtMatmulPreferenceSetAttribute"},
		{fn: &a.cublasLtMatmulAlgoGetHeuristic, name: "cublasLtMatmulAlgoGetHeuristic"},
		{fn: &a.cublasLtMatmul, name: "cublasLtMatmul"},
	}
}
