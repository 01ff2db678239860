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

// The PKCS#11 3.0 function table (OASIS PKCS#11 v3.0, section 5.1 and pkcs11f.h): the 2.40
// table, then the 3.0 functions in this order. Only the prefix up to the message-based
// encryption functions is declared: the table is read through a pointer the module owns, never
// copied, and only when the interface `C_GetInterface` returned says version 3.0 or later.
typedef struct hsmgw_ck_function_list_3_0 {
    CK_FUNCTION_LIST base;
    void *C_GetInterfaceList;
    void *C_GetInterface;
    void *C_LoginUser;
    void *C_SessionCancel;
    CK_RV (*C_MessageEncryptInit)(CK_SESSION_HANDLE session, CK_MECHANISM *mechanism, CK_OBJECT_HANDLE key);
    CK_RV (*C_EncryptMessage)(
        CK_SESSION_HANDLE session, void *parameter, CK_ULONG parameter_length, CK_BYTE *associated_data,
        CK_ULONG associated_data_length, CK_BYTE *plaintext, CK_ULONG plaintext_length, CK_BYTE *ciphertext,
        CK_ULONG *ciphertext_length);
    void *C_EncryptMessageBegin;
    void *C_EncryptMessageNext;
    CK_RV (*C_MessageEncryptFinal)(CK_SESSION_HANDLE session);
} hsmgw_ck_function_list_3_0;

// PKCS#11 3.0 `CK_GCM_MESSAGE_PARAMS` (section 2.13.4) and its IV generators.
typedef CK_ULONG hsmgw_ck_generator_function;
static const hsmgw_ck_generator_function hsmgw_ckg_no_generate = 0;
static const hsmgw_ck_generator_function hsmgw_ckg_generate = 1;
static const hsmgw_ck_generator_function hsmgw_ckg_generate_counter = 2;
static const hsmgw_ck_generator_function hsmgw_ckg_generate_random = 3;

typedef struct hsmgw_ck_gcm_message_params {
    CK_BYTE *pIv;
    CK_ULONG ulIvLen;
    CK_ULONG ulIvFixedBits;
    hsmgw_ck_generator_function ivGenerator;
    CK_BYTE *pTag;
    CK_ULONG ulTagBits;
} hsmgw_ck_gcm_message_params;

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
    /// 1 when the library is NSS's softoken (it exports NSS's own `NSC_GetFunctionList` and
    /// `FC_GetFunctionList` entry points), whose `C_Initialize` must be given a `configdir`.
    int nss_softoken;
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
