#define _GNU_SOURCE
#include "CPKCS11Shim.h"

#include <dlfcn.h>
#include <stdalign.h>
#include <stdio.h>
#include <string.h>

// ABI assumptions the Swift layer relies on (PKCS#11 on LP64 Unix: `unsigned long` is 64 bits,
// structures are not packed, CK_BBOOL is one byte).
_Static_assert(sizeof(CK_ULONG) == sizeof(unsigned long), "CK_ULONG is unsigned long");
_Static_assert(sizeof(CK_ULONG) == 8, "LP64: CK_ULONG is 64 bits");
_Static_assert(sizeof(void *) == 8, "LP64 pointers");
_Static_assert(sizeof(CK_BBOOL) == 1, "CK_BBOOL is one byte");
_Static_assert(sizeof(CK_ATTRIBUTE) == 24, "CK_ATTRIBUTE: type, pointer, length, not packed");
_Static_assert(offsetof(CK_ATTRIBUTE, pValue) == 8, "CK_ATTRIBUTE not packed");
_Static_assert(sizeof(CK_MECHANISM) == 24, "CK_MECHANISM: type, pointer, length");
_Static_assert(sizeof(CK_VERSION) == 2, "CK_VERSION is two bytes");
_Static_assert(offsetof(CK_FUNCTION_LIST, version) == 0, "function list starts with its version");
_Static_assert(offsetof(CK_FUNCTION_LIST, C_Initialize) == 8, "entry points follow the version");
// The v2.40-errata GCM parameters, with ulIvBits, which SoftHSM2 and most HSMs expect.
_Static_assert(sizeof(CK_GCM_PARAMS) == 48, "CK_GCM_PARAMS has six members");
_Static_assert(offsetof(CK_GCM_PARAMS, ulTagBits) == 40, "CK_GCM_PARAMS has ulIvBits");
_Static_assert(sizeof(hsmgw_ck_interface) == 24, "CK_INTERFACE: name, table, flags");
// The 2.40 table holds its version and 68 entry points; the 3.0 functions follow it.
_Static_assert(sizeof(CK_FUNCTION_LIST) == 8 + 68 * 8, "CK_FUNCTION_LIST: version and 68 entry points");
_Static_assert(offsetof(hsmgw_ck_function_list_3_0, C_GetInterfaceList) == sizeof(CK_FUNCTION_LIST), "3.0 extends 2.40");
_Static_assert(offsetof(hsmgw_ck_function_list_3_0, C_MessageEncryptInit) == 8 + 72 * 8, "C_MessageEncryptInit");
_Static_assert(offsetof(hsmgw_ck_function_list_3_0, C_MessageEncryptFinal) == 8 + 76 * 8, "C_MessageEncryptFinal");
_Static_assert(sizeof(hsmgw_ck_gcm_message_params) == 48, "CK_GCM_MESSAGE_PARAMS has six members");
_Static_assert(sizeof(CK_C_INITIALIZE_ARGS) == 48, "CK_C_INITIALIZE_ARGS: four callbacks, flags, reserved");

typedef CK_RV (*hsmgw_get_interface_fn)(CK_UTF8CHAR *, CK_VERSION *, hsmgw_ck_interface **, CK_FLAGS);

static void hsmgw_set_error(char *error, size_t capacity, const char *message) {
    if (error == NULL || capacity == 0) {
        return;
    }
    snprintf(error, capacity, "%s", message != NULL ? message : "unknown error");
}

hsmgw_p11_open_status hsmgw_p11_open(
    const char *path, hsmgw_p11_module *module, char *error, size_t error_capacity) {
    void *library = dlopen(path, RTLD_NOW | RTLD_LOCAL);
    if (library == NULL) {
        hsmgw_set_error(error, error_capacity, dlerror());
        return HSMGW_P11_DLOPEN_FAILED;
    }

    int nss_softoken = dlsym(library, "NSC_GetFunctionList") != NULL && dlsym(library, "FC_GetFunctionList") != NULL;
    hsmgw_get_interface_fn get_interface = (hsmgw_get_interface_fn)dlsym(library, "C_GetInterface");
    if (get_interface != NULL) {
        hsmgw_ck_interface *interface = NULL;
        CK_RV rv = get_interface((CK_UTF8CHAR *)"PKCS 11", NULL, &interface, 0);
        if (rv != CKR_OK) {
            module->entry_point_rv = rv;
            hsmgw_set_error(error, error_capacity, "C_GetInterface failed");
            dlclose(library);
            return HSMGW_P11_ENTRY_POINT_FAILED;
        }
        if (interface == NULL || interface->function_list == NULL) {
            hsmgw_set_error(error, error_capacity, "C_GetInterface returned no function list");
            dlclose(library);
            return HSMGW_P11_NO_FUNCTION_LIST;
        }
        module->library = library;
        module->functions = (CK_FUNCTION_LIST *)interface->function_list;
        module->via_get_interface = 1;
        module->interface_name = interface->interface_name;
        module->entry_point_rv = CKR_OK;
        module->nss_softoken = nss_softoken;
        return HSMGW_P11_OPENED;
    }

    CK_C_GetFunctionList get_function_list = (CK_C_GetFunctionList)dlsym(library, "C_GetFunctionList");
    if (get_function_list == NULL) {
        hsmgw_set_error(error, error_capacity, "exports neither C_GetInterface nor C_GetFunctionList");
        dlclose(library);
        return HSMGW_P11_NO_ENTRY_POINT;
    }
    CK_FUNCTION_LIST *functions = NULL;
    CK_RV rv = get_function_list(&functions);
    if (rv != CKR_OK) {
        module->entry_point_rv = rv;
        hsmgw_set_error(error, error_capacity, "C_GetFunctionList failed");
        dlclose(library);
        return HSMGW_P11_ENTRY_POINT_FAILED;
    }
    if (functions == NULL) {
        hsmgw_set_error(error, error_capacity, "C_GetFunctionList returned no function list");
        dlclose(library);
        return HSMGW_P11_NO_FUNCTION_LIST;
    }
    module->library = library;
    module->functions = functions;
    module->via_get_interface = 0;
    module->interface_name = NULL;
    module->entry_point_rv = CKR_OK;
    module->nss_softoken = nss_softoken;
    return HSMGW_P11_OPENED;
}

int hsmgw_p11_close(hsmgw_p11_module *module) {
    if (module == NULL || module->library == NULL) {
        return 0;
    }
    int result = dlclose(module->library);
    module->library = NULL;
    module->functions = NULL;
    return result;
}
