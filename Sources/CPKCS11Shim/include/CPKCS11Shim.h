// C shim for hsm-gateway: the PKCS#11 headers (from p11-kit) and the code that opens a module.
//
// Nothing else lives here: every decision is made in Swift (target `PKCS11`), which imports
// this module with `internal import` so that no `CK_*` type reaches a public Swift API.
#ifndef HSMGW_CPKCS11_SHIM_H
#define HSMGW_CPKCS11_SHIM_H

#include <stddef.h>
#include <p11-kit-1/p11-kit/pkcs11.h>

#ifdef __cplusplus
extern "C" {
#endif

// `CK_UNAVAILABLE_INFORMATION` and `CK_EFFECTIVELY_INFINITE` are macros Swift cannot import.
static const CK_ULONG hsmgw_ck_unavailable_information = CK_UNAVAILABLE_INFORMATION;
static const CK_ULONG hsmgw_ck_effectively_infinite = CK_EFFECTIVELY_INFINITE;

// PKCS#11 3.0 interface discovery. p11-kit 0.24 ships the 2.40 headers, which lack it, so the
// 3.0 layout is declared here (OASIS PKCS#11 v3.0 base specification, section 3.6).
typedef struct hsmgw_ck_interface {
    CK_UTF8CHAR *interface_name;
    void *function_list;
    CK_FLAGS flags;
} hsmgw_ck_interface;

/// How `hsmgw_p11_open` ended.
typedef enum hsmgw_p11_open_status {
    HSMGW_P11_OPENED = 0,
    /// `dlopen` failed: the file is missing or is not a loadable shared object (see `error`).
    HSMGW_P11_DLOPEN_FAILED = 1,
    /// The library exports neither `C_GetInterface` nor `C_GetFunctionList`.
    HSMGW_P11_NO_ENTRY_POINT = 2,
    /// The entry point returned an error (`entry_point_rv`).
    HSMGW_P11_ENTRY_POINT_FAILED = 3,
    /// The entry point returned CKR_OK but no function list.
    HSMGW_P11_NO_FUNCTION_LIST = 4,
} hsmgw_p11_open_status;

/// What `hsmgw_p11_open` found. `functions` points to a table whose first members have the
/// 2.40 `CK_FUNCTION_LIST` layout (a 3.0 table extends it), valid until `hsmgw_p11_close`.
typedef struct hsmgw_p11_module {
    void *library;
    CK_FUNCTION_LIST *functions;
    /// 1 when the table came from `C_GetInterface("PKCS 11")`, 0 from `C_GetFunctionList`.
    int via_get_interface;
    /// The interface name `C_GetInterface` returned (NULL otherwise); owned by the module.
    const CK_UTF8CHAR *interface_name;
    CK_RV entry_point_rv;
} hsmgw_p11_module;

/// Opens the module at `path` with `dlopen(RTLD_NOW | RTLD_LOCAL)` and fetches its function
/// table: `C_GetInterface("PKCS 11", NULL, …, 0)` when exported, `C_GetFunctionList` otherwise.
/// On failure the library is closed again and `error` (NUL-terminated, may be truncated) says
/// why; `module` is written only on success, except `entry_point_rv`, which holds the entry
/// point's `CK_RV` for `HSMGW_P11_ENTRY_POINT_FAILED`.
hsmgw_p11_open_status hsmgw_p11_open(
    const char *path, hsmgw_p11_module *module, char *error, size_t error_capacity);

/// Closes a library opened by `hsmgw_p11_open`; returns `dlclose`'s result.
int hsmgw_p11_close(hsmgw_p11_module *module);

#ifdef __cplusplus
}
#endif

#endif
