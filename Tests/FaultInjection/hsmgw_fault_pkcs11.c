// hsmgw_fault_pkcs11: a PKCS#11 module for tests that forwards every call to a real module
// (SoftHSM2) and injects the faults a test asks for, at run time.
//
// Tests compile it when they need it (`cc -shared -fPIC`, see FaultInjectingModule.swift in
// Tests/SoftHSMTestSupport) and load it like any module. It is never part of the product.
//
// Environment (read once, by the first C_GetFunctionList):
//   HSMGW_FAULT_MODULE   path of the real module to forward to (required)
//   HSMGW_FAULT_CONTROL  path of the control file (optional; absent or missing file: no faults)
//   HSMGW_FAULT_TRACE    path of a file to which every call appends one line (optional):
//                        "<function> rv=0x<hex>[ injected]\n", e.g. "C_Login rv=0xa0 injected"
//
// Control language. The control file is re-read whenever its inode, size or modification time
// changes (write a new file and rename it over the old one for an atomic switch); re-reading
// resets every counter. One rule per line; blank lines and lines starting with '#' are ignored:
//
//   <function|*> [skip=N] [count=N] [rv=<CKR_NAME|0xHEX|DECIMAL>] [overreport=N] [announce=N]
//                [delay_ms=N]
//
//   <function>   a PKCS#11 function name (C_Decrypt), or * for every function
//   skip=N       let the first N matching calls through untouched, then fire (default 0)
//   count=N      fire N times, then the rule is spent (default: for ever)
//   rv=X         return X instead of calling the real module (the call is not forwarded, so an
//                operation the real module has active stays active, as after a real failure)
//   overreport=N forward the call; when it succeeds with an output buffer, report N more bytes
//                (or handles, slots, mechanisms) than were written. For C_Encrypt, C_Decrypt,
//                C_WrapKey, C_GetAttributeValue (each value), C_FindObjects, C_GetSlotList,
//                C_GetMechanismList
//   announce=N   forward the call; when it is a size query (no output buffer) and succeeds,
//                report N as the length needed. Same functions as overreport
//   delay_ms=N   sleep N milliseconds before the call (a slow or hung HSM)
//
// The first rule that matches a call and is not spent decides. Examples:
//   C_Decrypt rv=CKR_BUFFER_TOO_SMALL count=1
//   C_Encrypt overreport=1
//   C_Login rv=CKR_PIN_INCORRECT
//   * rv=CKR_DEVICE_REMOVED
//   C_EncryptInit skip=1 count=1 rv=CKR_OPERATION_ACTIVE
//
// Model lines make the module behave like another kind of token, for as long as the control file
// holds them (they are not rules: no call matches them, and they never run out):
//
//   model [gcm_iv=writeback|append|append16] [hide_mechanism=<CKM_NAME|0xHEX>]...
//         [manufacturer=TEXT] [token_model=TEXT] [max_sessions=N]
//
//   gcm_iv=writeback  an HSM in FIPS mode that generates AES-GCM IVs the AWS CloudHSM way:
//                     C_EncryptInit with CKM_AES_GCM accepts only pIv pointing to 12 zero bytes
//                     (ulIvLen 12), generates a 12-byte IV and writes it into pIv; any other IV
//                     is refused with CKR_MECHANISM_PARAM_INVALID, as a caller-chosen IV is
//   gcm_iv=append     the Thales Luna way (firmware 7.9.3+, FIPS mode): accepts only ulIvLen 0
//                     with ulIvBits 96, and C_Encrypt appends the generated 12-byte IV after the tag
//   gcm_iv=append16   Luna before firmware 7.9.3: the same, with a 16-byte IV
//   hide_mechanism=X  C_GetMechanismList leaves X out, C_GetMechanismInfo, C_EncryptInit and
//                     C_DecryptInit answer CKR_MECHANISM_INVALID for it (an older HSM); up to 8
//   manufacturer=TEXT C_GetInfo and C_GetTokenInfo report TEXT as manufacturerID ('_' is a space)
//   token_model=TEXT  C_GetTokenInfo reports TEXT as model ('_' is a space)
//   max_sessions=N    C_GetTokenInfo reports N as ulMaxSessionCount
//
// C_Initialize is forwarded too: in a process where the real module is initialised already,
// the caller sees CKR_CRYPTOKI_ALREADY_INITIALIZED, as for a second load of the real module.
#define _GNU_SOURCE
#include <p11-kit-1/p11-kit/pkcs11.h>

#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#define FAULT_MAX_RULES 64
#define FAULT_NAME_MAX 48

typedef struct fault_rule {
    char function[FAULT_NAME_MAX];  // "*" matches every function
    long skip;                      // matching calls still to let through
    long count;                     // firings left; -1 for ever
    int has_rv;
    CK_RV rv;
    CK_ULONG overreport;
    int has_announce;
    CK_ULONG announce;
    long delay_ms;
} fault_rule;

// What one call is to suffer, decided under the lock and acted on outside it.
typedef struct fault_action {
    int inject_rv;
    CK_RV rv;
    CK_ULONG overreport;
    int has_announce;
    CK_ULONG announce;
    long delay_ms;
} fault_action;

static pthread_mutex_t fault_lock = PTHREAD_MUTEX_INITIALIZER;
static CK_FUNCTION_LIST *real = NULL;
static const char *control_path = NULL;
static const char *trace_path = NULL;
static fault_rule rules[FAULT_MAX_RULES];
static int rule_count = 0;
static struct stat control_seen;
static int control_seen_valid = 0;

// The token being emulated (model lines); reset with the rules.
enum { GCM_IV_CALLER = 0, GCM_IV_WRITEBACK, GCM_IV_APPEND, GCM_IV_APPEND16 };
#define FAULT_MAX_HIDDEN 8
static int model_gcm_iv = GCM_IV_CALLER;
static CK_MECHANISM_TYPE model_hidden[FAULT_MAX_HIDDEN];
static int model_hidden_count = 0;
static char model_manufacturer[33];
static char model_token_model[17];
static long model_max_sessions = -1;

// IVs generated in C_EncryptInit (gcm_iv=append*) for C_Encrypt to append, by session.
#define FAULT_MAX_PENDING 128
typedef struct pending_iv {
    CK_SESSION_HANDLE session;
    int used;
    CK_ULONG length;
    CK_BYTE iv[16];
} pending_iv;
static pending_iv pending[FAULT_MAX_PENDING];

static const struct {
    const char *name;
    CK_MECHANISM_TYPE value;
} mechanism_names[] = {
    {"CKM_AES_GCM", CKM_AES_GCM}, {"CKM_AES_KEY_GEN", CKM_AES_KEY_GEN},
    {"CKM_AES_KEY_WRAP", 0x2109}, {"CKM_AES_KEY_WRAP_PAD", 0x210A},
    {"CKM_SHA256_HMAC", CKM_SHA256_HMAC}, {"CKM_GENERIC_SECRET_KEY_GEN", CKM_GENERIC_SECRET_KEY_GEN},
};

static int parse_number(const char *text, unsigned long long *value);
static int is_hidden_locked(CK_MECHANISM_TYPE type);

static int parse_mechanism(const char *text, CK_MECHANISM_TYPE *type) {
    for (size_t i = 0; i < sizeof(mechanism_names) / sizeof(mechanism_names[0]); i++) {
        if (strcmp(text, mechanism_names[i].name) == 0) {
            *type = mechanism_names[i].value;
            return 1;
        }
    }
    char *end = NULL;
    errno = 0;
    unsigned long long value = strtoull(text, &end, 0);
    if (errno != 0 || end == text || *end != '\0') {
        return 0;
    }
    *type = (CK_MECHANISM_TYPE)value;
    return 1;
}

// A model text: '_' stands for a space (the control language splits on blanks).
static void copy_model_text(char *target, size_t size, const char *value) {
    snprintf(target, size, "%s", value);
    for (char *c = target; *c != '\0'; c++) {
        if (*c == '_') {
            *c = ' ';
        }
    }
}

// Parses the keys of a `model` line. Called with fault_lock held.
static int parse_model_locked(char **save) {
    char *token;
    while ((token = strtok_r(NULL, " \t\r\n", save)) != NULL) {
        char *equals = strchr(token, '=');
        if (equals == NULL) {
            return 0;
        }
        *equals = '\0';
        const char *key = token;
        const char *value = equals + 1;
        unsigned long long number = 0;
        if (strcmp(key, "gcm_iv") == 0) {
            if (strcmp(value, "writeback") == 0) {
                model_gcm_iv = GCM_IV_WRITEBACK;
            } else if (strcmp(value, "append") == 0) {
                model_gcm_iv = GCM_IV_APPEND;
            } else if (strcmp(value, "append16") == 0) {
                model_gcm_iv = GCM_IV_APPEND16;
            } else {
                return 0;
            }
        } else if (strcmp(key, "hide_mechanism") == 0 && model_hidden_count < FAULT_MAX_HIDDEN) {
            if (!parse_mechanism(value, &model_hidden[model_hidden_count])) {
                return 0;
            }
            model_hidden_count++;
        } else if (strcmp(key, "manufacturer") == 0) {
            copy_model_text(model_manufacturer, sizeof(model_manufacturer), value);
        } else if (strcmp(key, "token_model") == 0) {
            copy_model_text(model_token_model, sizeof(model_token_model), value);
        } else if (strcmp(key, "max_sessions") == 0 && parse_number(value, &number)) {
            model_max_sessions = (long)number;
        } else {
            return 0;
        }
    }
    return 1;
}

static const struct {
    const char *name;
    CK_RV value;
} rv_names[] = {
    {"CKR_OK", CKR_OK},
    {"CKR_HOST_MEMORY", CKR_HOST_MEMORY},
    {"CKR_SLOT_ID_INVALID", CKR_SLOT_ID_INVALID},
    {"CKR_GENERAL_ERROR", CKR_GENERAL_ERROR},
    {"CKR_FUNCTION_FAILED", CKR_FUNCTION_FAILED},
    {"CKR_ARGUMENTS_BAD", CKR_ARGUMENTS_BAD},
    {"CKR_DATA_LEN_RANGE", CKR_DATA_LEN_RANGE},
    {"CKR_DEVICE_ERROR", CKR_DEVICE_ERROR},
    {"CKR_DEVICE_MEMORY", CKR_DEVICE_MEMORY},
    {"CKR_DEVICE_REMOVED", CKR_DEVICE_REMOVED},
    {"CKR_AEAD_DECRYPT_FAILED", 0x35},
    {"CKR_ENCRYPTED_DATA_INVALID", CKR_ENCRYPTED_DATA_INVALID},
    {"CKR_ENCRYPTED_DATA_LEN_RANGE", CKR_ENCRYPTED_DATA_LEN_RANGE},
    {"CKR_FUNCTION_CANCELED", CKR_FUNCTION_CANCELED},
    {"CKR_FUNCTION_NOT_SUPPORTED", CKR_FUNCTION_NOT_SUPPORTED},
    {"CKR_KEY_HANDLE_INVALID", CKR_KEY_HANDLE_INVALID},
    {"CKR_OBJECT_HANDLE_INVALID", CKR_OBJECT_HANDLE_INVALID},
    {"CKR_OPERATION_ACTIVE", CKR_OPERATION_ACTIVE},
    {"CKR_OPERATION_NOT_INITIALIZED", CKR_OPERATION_NOT_INITIALIZED},
    {"CKR_PIN_INCORRECT", CKR_PIN_INCORRECT},
    {"CKR_PIN_INVALID", CKR_PIN_INVALID},
    {"CKR_PIN_LEN_RANGE", CKR_PIN_LEN_RANGE},
    {"CKR_PIN_EXPIRED", CKR_PIN_EXPIRED},
    {"CKR_PIN_LOCKED", CKR_PIN_LOCKED},
    {"CKR_SESSION_CLOSED", CKR_SESSION_CLOSED},
    {"CKR_SESSION_COUNT", CKR_SESSION_COUNT},
    {"CKR_SESSION_HANDLE_INVALID", CKR_SESSION_HANDLE_INVALID},
    {"CKR_TOKEN_NOT_PRESENT", CKR_TOKEN_NOT_PRESENT},
    {"CKR_TOKEN_NOT_RECOGNIZED", CKR_TOKEN_NOT_RECOGNIZED},
    {"CKR_USER_NOT_LOGGED_IN", CKR_USER_NOT_LOGGED_IN},
    {"CKR_USER_PIN_NOT_INITIALIZED", CKR_USER_PIN_NOT_INITIALIZED},
    {"CKR_BUFFER_TOO_SMALL", CKR_BUFFER_TOO_SMALL},
    {"CKR_CRYPTOKI_NOT_INITIALIZED", CKR_CRYPTOKI_NOT_INITIALIZED},
    {"CKR_CRYPTOKI_ALREADY_INITIALIZED", CKR_CRYPTOKI_ALREADY_INITIALIZED},
};

static int parse_rv(const char *text, CK_RV *rv) {
    for (size_t i = 0; i < sizeof(rv_names) / sizeof(rv_names[0]); i++) {
        if (strcmp(text, rv_names[i].name) == 0) {
            *rv = rv_names[i].value;
            return 1;
        }
    }
    char *end = NULL;
    errno = 0;
    unsigned long long value = strtoull(text, &end, 0);
    if (errno != 0 || end == text || *end != '\0') {
        return 0;
    }
    *rv = (CK_RV)value;
    return 1;
}

static int parse_number(const char *text, unsigned long long *value) {
    char *end = NULL;
    errno = 0;
    *value = strtoull(text, &end, 0);
    return errno == 0 && end != text && *end == '\0';
}

// Re-reads the control file when it changed. Called with fault_lock held.
static void reload_rules_locked(void) {
    if (control_path == NULL) {
        return;
    }
    struct stat now;
    if (stat(control_path, &now) != 0) {
        rule_count = 0;
        control_seen_valid = 0;
        return;
    }
    if (control_seen_valid && now.st_ino == control_seen.st_ino && now.st_size == control_seen.st_size &&
        now.st_mtim.tv_sec == control_seen.st_mtim.tv_sec && now.st_mtim.tv_nsec == control_seen.st_mtim.tv_nsec) {
        return;
    }
    control_seen = now;
    control_seen_valid = 1;
    rule_count = 0;
    model_gcm_iv = GCM_IV_CALLER;
    model_hidden_count = 0;
    model_manufacturer[0] = '\0';
    model_token_model[0] = '\0';
    model_max_sessions = -1;
    FILE *file = fopen(control_path, "r");
    if (file == NULL) {
        return;
    }
    char line[512];
    while (fgets(line, sizeof(line), file) != NULL && rule_count < FAULT_MAX_RULES) {
        char *save = NULL;
        char *token = strtok_r(line, " \t\r\n", &save);
        if (token == NULL || token[0] == '#') {
            continue;
        }
        if (strcmp(token, "model") == 0) {
            if (!parse_model_locked(&save)) {
                fprintf(stderr, "hsmgw_fault_pkcs11: ignoring the rest of a malformed model line in %s\n", control_path);
            }
            continue;
        }
        fault_rule rule;
        memset(&rule, 0, sizeof(rule));
        rule.count = -1;
        snprintf(rule.function, sizeof(rule.function), "%s", token);
        int valid = 1;
        while ((token = strtok_r(NULL, " \t\r\n", &save)) != NULL) {
            char *equals = strchr(token, '=');
            if (equals == NULL) {
                valid = 0;
                break;
            }
            *equals = '\0';
            const char *key = token;
            const char *value = equals + 1;
            unsigned long long number = 0;
            if (strcmp(key, "rv") == 0) {
                valid = parse_rv(value, &rule.rv);
                rule.has_rv = 1;
            } else if (strcmp(key, "skip") == 0 && parse_number(value, &number)) {
                rule.skip = (long)number;
            } else if (strcmp(key, "count") == 0 && parse_number(value, &number)) {
                rule.count = (long)number;
            } else if (strcmp(key, "overreport") == 0 && parse_number(value, &number)) {
                rule.overreport = (CK_ULONG)number;
            } else if (strcmp(key, "announce") == 0 && parse_number(value, &number)) {
                rule.announce = (CK_ULONG)number;
                rule.has_announce = 1;
            } else if (strcmp(key, "delay_ms") == 0 && parse_number(value, &number)) {
                rule.delay_ms = (long)number;
            } else {
                valid = 0;
            }
            if (!valid) {
                break;
            }
        }
        if (valid) {
            rules[rule_count++] = rule;
        } else {
            fprintf(stderr, "hsmgw_fault_pkcs11: ignoring malformed rule for %s in %s\n", rule.function, control_path);
        }
    }
    fclose(file);
}

// Decides what happens to one call of `function`.
static fault_action decide(const char *function) {
    fault_action action;
    memset(&action, 0, sizeof(action));
    pthread_mutex_lock(&fault_lock);
    reload_rules_locked();
    for (int i = 0; i < rule_count; i++) {
        fault_rule *rule = &rules[i];
        if (rule->count == 0) {
            continue;
        }
        if (strcmp(rule->function, "*") != 0 && strcmp(rule->function, function) != 0) {
            continue;
        }
        if (rule->skip > 0) {
            rule->skip--;
            break;
        }
        if (rule->count > 0) {
            rule->count--;
        }
        action.inject_rv = rule->has_rv;
        action.rv = rule->rv;
        action.overreport = rule->overreport;
        action.has_announce = rule->has_announce;
        action.announce = rule->announce;
        action.delay_ms = rule->delay_ms;
        break;
    }
    pthread_mutex_unlock(&fault_lock);
    if (action.delay_ms > 0) {
        struct timespec pause = {action.delay_ms / 1000, (action.delay_ms % 1000) * 1000000L};
        while (nanosleep(&pause, &pause) != 0 && errno == EINTR) {
        }
    }
    return action;
}

static CK_RV trace(const char *function, CK_RV rv, int injected) {
    if (trace_path != NULL) {
        char line[128];
        int length = snprintf(line, sizeof(line), "%s rv=0x%lx%s\n", function, (unsigned long)rv,
                              injected ? " injected" : "");
        int fd = open(trace_path, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0600);
        if (fd >= 0) {
            ssize_t ignored = write(fd, line, (size_t)length);
            (void)ignored;
            close(fd);
        }
    }
    return rv;
}

// Adjusts a reported length after a successful forwarded call.
static void adjust_length(const fault_action *action, int had_output, CK_ULONG *length) {
    if (length == NULL) {
        return;
    }
    if (had_output) {
        *length += action->overreport;
    } else if (action->has_announce) {
        *length = action->announce;
    }
}

#define FORWARD(name, params, args)                                  \
    static CK_RV fault_##name params {                               \
        fault_action action = decide(#name);                         \
        if (action.inject_rv) {                                      \
            return trace(#name, action.rv, 1);                       \
        }                                                            \
        if (real->name == NULL) {                                    \
            return trace(#name, CKR_FUNCTION_NOT_SUPPORTED, 0);      \
        }                                                            \
        return trace(#name, real->name args, 0);                     \
    }

FORWARD(C_Initialize, (void *init_args), (init_args))
FORWARD(C_Finalize, (void *reserved), (reserved))
FORWARD(C_GetSlotInfo, (CK_SLOT_ID slot_id, CK_SLOT_INFO *info), (slot_id, info))
FORWARD(C_InitToken, (CK_SLOT_ID slot_id, CK_BYTE *pin, CK_ULONG pin_len, CK_BYTE *label), (slot_id, pin, pin_len, label))
FORWARD(C_InitPIN, (CK_SESSION_HANDLE session, CK_BYTE *pin, CK_ULONG pin_len), (session, pin, pin_len))
FORWARD(C_SetPIN, (CK_SESSION_HANDLE session, CK_BYTE *old_pin, CK_ULONG old_len, CK_BYTE *new_pin, CK_ULONG new_len), (session, old_pin, old_len, new_pin, new_len))
FORWARD(C_OpenSession, (CK_SLOT_ID slot_id, CK_FLAGS flags, void *application, CK_NOTIFY notify, CK_SESSION_HANDLE *session), (slot_id, flags, application, notify, session))
FORWARD(C_CloseSession, (CK_SESSION_HANDLE session), (session))
FORWARD(C_CloseAllSessions, (CK_SLOT_ID slot_id), (slot_id))
FORWARD(C_GetSessionInfo, (CK_SESSION_HANDLE session, CK_SESSION_INFO *info), (session, info))
FORWARD(C_GetOperationState, (CK_SESSION_HANDLE session, CK_BYTE *operation_state, CK_ULONG *operation_state_len), (session, operation_state, operation_state_len))
FORWARD(C_SetOperationState, (CK_SESSION_HANDLE session, CK_BYTE *operation_state, CK_ULONG operation_state_len, CK_OBJECT_HANDLE encryption_key, CK_OBJECT_HANDLE authentiation_key), (session, operation_state, operation_state_len, encryption_key, authentiation_key))
FORWARD(C_Login, (CK_SESSION_HANDLE session, CK_USER_TYPE user_type, CK_BYTE *pin, CK_ULONG pin_len), (session, user_type, pin, pin_len))
FORWARD(C_Logout, (CK_SESSION_HANDLE session), (session))
FORWARD(C_CreateObject, (CK_SESSION_HANDLE session, CK_ATTRIBUTE *templ, CK_ULONG count, CK_OBJECT_HANDLE *object), (session, templ, count, object))
FORWARD(C_CopyObject, (CK_SESSION_HANDLE session, CK_OBJECT_HANDLE object, CK_ATTRIBUTE *templ, CK_ULONG count, CK_OBJECT_HANDLE *new_object), (session, object, templ, count, new_object))
FORWARD(C_DestroyObject, (CK_SESSION_HANDLE session, CK_OBJECT_HANDLE object), (session, object))
FORWARD(C_GetObjectSize, (CK_SESSION_HANDLE session, CK_OBJECT_HANDLE object, CK_ULONG *size), (session, object, size))
FORWARD(C_SetAttributeValue, (CK_SESSION_HANDLE session, CK_OBJECT_HANDLE object, CK_ATTRIBUTE *templ, CK_ULONG count), (session, object, templ, count))
FORWARD(C_FindObjectsInit, (CK_SESSION_HANDLE session, CK_ATTRIBUTE *templ, CK_ULONG count), (session, templ, count))
FORWARD(C_FindObjectsFinal, (CK_SESSION_HANDLE session), (session))
FORWARD(C_EncryptUpdate, (CK_SESSION_HANDLE session, CK_BYTE *part, CK_ULONG part_len, CK_BYTE *encrypted_part, CK_ULONG *encrypted_part_len), (session, part, part_len, encrypted_part, encrypted_part_len))
FORWARD(C_EncryptFinal, (CK_SESSION_HANDLE session, CK_BYTE *last_encrypted_part, CK_ULONG *last_encrypted_part_len), (session, last_encrypted_part, last_encrypted_part_len))
FORWARD(C_DecryptUpdate, (CK_SESSION_HANDLE session, CK_BYTE *encrypted_part, CK_ULONG encrypted_part_len, CK_BYTE *part, CK_ULONG *part_len), (session, encrypted_part, encrypted_part_len, part, part_len))
FORWARD(C_DecryptFinal, (CK_SESSION_HANDLE session, CK_BYTE *last_part, CK_ULONG *last_part_len), (session, last_part, last_part_len))
FORWARD(C_DigestInit, (CK_SESSION_HANDLE session, CK_MECHANISM *mechanism), (session, mechanism))
FORWARD(C_Digest, (CK_SESSION_HANDLE session, CK_BYTE *data, CK_ULONG data_len, CK_BYTE *digest, CK_ULONG *digest_len), (session, data, data_len, digest, digest_len))
FORWARD(C_DigestUpdate, (CK_SESSION_HANDLE session, CK_BYTE *part, CK_ULONG part_len), (session, part, part_len))
FORWARD(C_DigestKey, (CK_SESSION_HANDLE session, CK_OBJECT_HANDLE key), (session, key))
FORWARD(C_DigestFinal, (CK_SESSION_HANDLE session, CK_BYTE *digest, CK_ULONG *digest_len), (session, digest, digest_len))
FORWARD(C_SignInit, (CK_SESSION_HANDLE session, CK_MECHANISM *mechanism, CK_OBJECT_HANDLE key), (session, mechanism, key))
FORWARD(C_Sign, (CK_SESSION_HANDLE session, CK_BYTE *data, CK_ULONG data_len, CK_BYTE *signature, CK_ULONG *signature_len), (session, data, data_len, signature, signature_len))
FORWARD(C_SignUpdate, (CK_SESSION_HANDLE session, CK_BYTE *part, CK_ULONG part_len), (session, part, part_len))
FORWARD(C_SignFinal, (CK_SESSION_HANDLE session, CK_BYTE *signature, CK_ULONG *signature_len), (session, signature, signature_len))
FORWARD(C_SignRecoverInit, (CK_SESSION_HANDLE session, CK_MECHANISM *mechanism, CK_OBJECT_HANDLE key), (session, mechanism, key))
FORWARD(C_SignRecover, (CK_SESSION_HANDLE session, CK_BYTE *data, CK_ULONG data_len, CK_BYTE *signature, CK_ULONG *signature_len), (session, data, data_len, signature, signature_len))
FORWARD(C_VerifyInit, (CK_SESSION_HANDLE session, CK_MECHANISM *mechanism, CK_OBJECT_HANDLE key), (session, mechanism, key))
FORWARD(C_Verify, (CK_SESSION_HANDLE session, CK_BYTE *data, CK_ULONG data_len, CK_BYTE *signature, CK_ULONG signature_len), (session, data, data_len, signature, signature_len))
FORWARD(C_VerifyUpdate, (CK_SESSION_HANDLE session, CK_BYTE *part, CK_ULONG part_len), (session, part, part_len))
FORWARD(C_VerifyFinal, (CK_SESSION_HANDLE session, CK_BYTE *signature, CK_ULONG signature_len), (session, signature, signature_len))
FORWARD(C_VerifyRecoverInit, (CK_SESSION_HANDLE session, CK_MECHANISM *mechanism, CK_OBJECT_HANDLE key), (session, mechanism, key))
FORWARD(C_VerifyRecover, (CK_SESSION_HANDLE session, CK_BYTE *signature, CK_ULONG signature_len, CK_BYTE *data, CK_ULONG *data_len), (session, signature, signature_len, data, data_len))
FORWARD(C_DigestEncryptUpdate, (CK_SESSION_HANDLE session, CK_BYTE *part, CK_ULONG part_len, CK_BYTE *encrypted_part, CK_ULONG *encrypted_part_len), (session, part, part_len, encrypted_part, encrypted_part_len))
FORWARD(C_DecryptDigestUpdate, (CK_SESSION_HANDLE session, CK_BYTE *encrypted_part, CK_ULONG encrypted_part_len, CK_BYTE *part, CK_ULONG *part_len), (session, encrypted_part, encrypted_part_len, part, part_len))
FORWARD(C_SignEncryptUpdate, (CK_SESSION_HANDLE session, CK_BYTE *part, CK_ULONG part_len, CK_BYTE *encrypted_part, CK_ULONG *encrypted_part_len), (session, part, part_len, encrypted_part, encrypted_part_len))
FORWARD(C_DecryptVerifyUpdate, (CK_SESSION_HANDLE session, CK_BYTE *encrypted_part, CK_ULONG encrypted_part_len, CK_BYTE *part, CK_ULONG *part_len), (session, encrypted_part, encrypted_part_len, part, part_len))
FORWARD(C_GenerateKey, (CK_SESSION_HANDLE session, CK_MECHANISM *mechanism, CK_ATTRIBUTE *templ, CK_ULONG count, CK_OBJECT_HANDLE *key), (session, mechanism, templ, count, key))
FORWARD(C_GenerateKeyPair, (CK_SESSION_HANDLE session, CK_MECHANISM *mechanism, CK_ATTRIBUTE *public_key_template, CK_ULONG public_key_attribute_count, CK_ATTRIBUTE *private_key_template, CK_ULONG private_key_attribute_count, CK_OBJECT_HANDLE *public_key, CK_OBJECT_HANDLE *private_key), (session, mechanism, public_key_template, public_key_attribute_count, private_key_template, private_key_attribute_count, public_key, private_key))
FORWARD(C_UnwrapKey, (CK_SESSION_HANDLE session, CK_MECHANISM *mechanism, CK_OBJECT_HANDLE unwrapping_key, CK_BYTE *wrapped_key, CK_ULONG wrapped_key_len, CK_ATTRIBUTE *templ, CK_ULONG attribute_count, CK_OBJECT_HANDLE *key), (session, mechanism, unwrapping_key, wrapped_key, wrapped_key_len, templ, attribute_count, key))
FORWARD(C_DeriveKey, (CK_SESSION_HANDLE session, CK_MECHANISM *mechanism, CK_OBJECT_HANDLE base_key, CK_ATTRIBUTE *templ, CK_ULONG attribute_count, CK_OBJECT_HANDLE *key), (session, mechanism, base_key, templ, attribute_count, key))
FORWARD(C_SeedRandom, (CK_SESSION_HANDLE session, CK_BYTE *seed, CK_ULONG seed_len), (session, seed, seed_len))
FORWARD(C_GenerateRandom, (CK_SESSION_HANDLE session, CK_BYTE *random_data, CK_ULONG random_len), (session, random_data, random_len))
FORWARD(C_GetFunctionStatus, (CK_SESSION_HANDLE session), (session))
FORWARD(C_CancelFunction, (CK_SESSION_HANDLE session), (session))
FORWARD(C_WaitForSlotEvent, (CK_FLAGS flags, CK_SLOT_ID *slot, void *reserved), (flags, slot, reserved))

// The calls that report lengths: `overreport` and `announce` apply to them.

static CK_RV fault_C_GetSlotList(CK_BBOOL token_present, CK_SLOT_ID *slot_list, CK_ULONG *count) {
    fault_action action = decide("C_GetSlotList");
    if (action.inject_rv) {
        return trace("C_GetSlotList", action.rv, 1);
    }
    CK_RV rv = real->C_GetSlotList(token_present, slot_list, count);
    if (rv == CKR_OK) {
        adjust_length(&action, slot_list != NULL, count);
    }
    return trace("C_GetSlotList", rv, 0);
}

static CK_RV fault_C_GetMechanismList(CK_SLOT_ID slot_id, CK_MECHANISM_TYPE *mechanism_list,
                                      CK_ULONG *count) {
    fault_action action = decide("C_GetMechanismList");
    if (action.inject_rv) {
        return trace("C_GetMechanismList", action.rv, 1);
    }
    CK_RV rv = real->C_GetMechanismList(slot_id, mechanism_list, count);
    if (rv == CKR_OK && mechanism_list != NULL && count != NULL) {
        // Hidden mechanisms are left out: the list closes up over them.
        pthread_mutex_lock(&fault_lock);
        CK_ULONG kept = 0;
        for (CK_ULONG i = 0; i < *count; i++) {
            if (!is_hidden_locked(mechanism_list[i])) {
                mechanism_list[kept++] = mechanism_list[i];
            }
        }
        *count = kept;
        pthread_mutex_unlock(&fault_lock);
    }
    if (rv == CKR_OK) {
        adjust_length(&action, mechanism_list != NULL, count);
    }
    return trace("C_GetMechanismList", rv, 0);
}

static CK_RV fault_C_GetAttributeValue(CK_SESSION_HANDLE session, CK_OBJECT_HANDLE object,
                                       CK_ATTRIBUTE *templ, CK_ULONG count) {
    fault_action action = decide("C_GetAttributeValue");
    if (action.inject_rv) {
        return trace("C_GetAttributeValue", action.rv, 1);
    }
    CK_RV rv = real->C_GetAttributeValue(session, object, templ, count);
    if (rv == CKR_OK && templ != NULL) {
        for (CK_ULONG i = 0; i < count; i++) {
            if (templ[i].ulValueLen != CK_UNAVAILABLE_INFORMATION) {
                adjust_length(&action, templ[i].pValue != NULL, &templ[i].ulValueLen);
            }
        }
    }
    return trace("C_GetAttributeValue", rv, 0);
}

static CK_RV fault_C_FindObjects(CK_SESSION_HANDLE session, CK_OBJECT_HANDLE *object, CK_ULONG max_object_count,
                                 CK_ULONG *object_count) {
    fault_action action = decide("C_FindObjects");
    if (action.inject_rv) {
        return trace("C_FindObjects", action.rv, 1);
    }
    CK_RV rv = real->C_FindObjects(session, object, max_object_count, object_count);
    if (rv == CKR_OK) {
        adjust_length(&action, 1, object_count);
    }
    return trace("C_FindObjects", rv, 0);
}

// The pending appended IV of `session`, or NULL. Called with fault_lock held.
static pending_iv *find_pending_locked(CK_SESSION_HANDLE session) {
    for (int i = 0; i < FAULT_MAX_PENDING; i++) {
        if (pending[i].used && pending[i].session == session) {
            return &pending[i];
        }
    }
    return NULL;
}

static int is_hidden_locked(CK_MECHANISM_TYPE type) {
    for (int i = 0; i < model_hidden_count; i++) {
        if (model_hidden[i] == type) {
            return 1;
        }
    }
    return 0;
}

static int is_hidden(CK_MECHANISM_TYPE type) {
    pthread_mutex_lock(&fault_lock);
    int hidden = is_hidden_locked(type);
    pthread_mutex_unlock(&fault_lock);
    return hidden;
}

static void pad_text(CK_UTF8CHAR *field, size_t size, const char *text) {
    memset(field, ' ', size);
    size_t length = strlen(text);
    memcpy(field, text, length < size ? length : size);
}

static CK_RV fault_C_GetInfo(CK_INFO *info) {
    fault_action action = decide("C_GetInfo");
    if (action.inject_rv) {
        return trace("C_GetInfo", action.rv, 1);
    }
    CK_RV rv = real->C_GetInfo(info);
    pthread_mutex_lock(&fault_lock);
    if (rv == CKR_OK && info != NULL && model_manufacturer[0] != '\0') {
        pad_text(info->manufacturerID, sizeof(info->manufacturerID), model_manufacturer);
    }
    pthread_mutex_unlock(&fault_lock);
    return trace("C_GetInfo", rv, 0);
}

static CK_RV fault_C_GetTokenInfo(CK_SLOT_ID slot_id, CK_TOKEN_INFO *info) {
    fault_action action = decide("C_GetTokenInfo");
    if (action.inject_rv) {
        return trace("C_GetTokenInfo", action.rv, 1);
    }
    CK_RV rv = real->C_GetTokenInfo(slot_id, info);
    pthread_mutex_lock(&fault_lock);
    if (rv == CKR_OK && info != NULL) {
        if (model_manufacturer[0] != '\0') {
            pad_text(info->manufacturerID, sizeof(info->manufacturerID), model_manufacturer);
        }
        if (model_token_model[0] != '\0') {
            pad_text(info->model, sizeof(info->model), model_token_model);
        }
        if (model_max_sessions >= 0) {
            info->ulMaxSessionCount = (CK_ULONG)model_max_sessions;
        }
    }
    pthread_mutex_unlock(&fault_lock);
    return trace("C_GetTokenInfo", rv, 0);
}

static CK_RV fault_C_GetMechanismInfo(CK_SLOT_ID slot_id, CK_MECHANISM_TYPE type, CK_MECHANISM_INFO *info) {
    fault_action action = decide("C_GetMechanismInfo");
    if (action.inject_rv) {
        return trace("C_GetMechanismInfo", action.rv, 1);
    }
    if (is_hidden(type)) {
        return trace("C_GetMechanismInfo", CKR_MECHANISM_INVALID, 1);
    }
    return trace("C_GetMechanismInfo", real->C_GetMechanismInfo(slot_id, type, info), 0);
}

static CK_RV fault_C_DecryptInit(CK_SESSION_HANDLE session, CK_MECHANISM *mechanism, CK_OBJECT_HANDLE key) {
    fault_action action = decide("C_DecryptInit");
    if (action.inject_rv) {
        return trace("C_DecryptInit", action.rv, 1);
    }
    if (mechanism != NULL && is_hidden(mechanism->mechanism)) {
        return trace("C_DecryptInit", CKR_MECHANISM_INVALID, 1);
    }
    return trace("C_DecryptInit", real->C_DecryptInit(session, mechanism, key), 0);
}

// C_EncryptInit, with the emulated token's rules for AES-GCM IVs (model gcm_iv=...).
static CK_RV fault_C_EncryptInit(CK_SESSION_HANDLE session, CK_MECHANISM *mechanism, CK_OBJECT_HANDLE key) {
    fault_action action = decide("C_EncryptInit");
    if (action.inject_rv) {
        return trace("C_EncryptInit", action.rv, 1);
    }
    if (mechanism != NULL && is_hidden(mechanism->mechanism)) {
        return trace("C_EncryptInit", CKR_MECHANISM_INVALID, 1);
    }
    pthread_mutex_lock(&fault_lock);
    int mode = model_gcm_iv;
    pthread_mutex_unlock(&fault_lock);
    if (mode == GCM_IV_CALLER || mechanism == NULL || mechanism->mechanism != CKM_AES_GCM ||
        mechanism->pParameter == NULL || mechanism->ulParameterLen != sizeof(CK_GCM_PARAMS)) {
        return trace("C_EncryptInit", real->C_EncryptInit(session, mechanism, key), 0);
    }
    CK_GCM_PARAMS *given = (CK_GCM_PARAMS *)mechanism->pParameter;
    CK_GCM_PARAMS parameters = *given;
    CK_BYTE generated[16];
    CK_ULONG length = mode == GCM_IV_APPEND16 ? 16 : 12;
    if (mode == GCM_IV_WRITEBACK) {
        // Only the "generate" form: a 12-byte buffer of zeros, which the HSM overwrites.
        int zero = given->pIv != NULL && given->ulIvLen == 12;
        for (CK_ULONG i = 0; zero && i < given->ulIvLen; i++) {
            zero = given->pIv[i] == 0;
        }
        if (!zero) {
            return trace("C_EncryptInit", CKR_MECHANISM_PARAM_INVALID, 1);
        }
    } else if (given->ulIvLen != 0 || given->ulIvBits != 96) {
        // Luna's "generate" form: no IV, 96 bits asked for.
        return trace("C_EncryptInit", CKR_MECHANISM_PARAM_INVALID, 1);
    }
    CK_RV rv = real->C_GenerateRandom(session, generated, length);
    if (rv != CKR_OK) {
        return trace("C_EncryptInit", rv, 0);
    }
    parameters.pIv = generated;
    parameters.ulIvLen = length;
    parameters.ulIvBits = length * 8;
    CK_MECHANISM forwarded = {CKM_AES_GCM, &parameters, sizeof(parameters)};
    rv = real->C_EncryptInit(session, &forwarded, key);
    if (rv != CKR_OK) {
        return trace("C_EncryptInit", rv, 0);
    }
    if (mode == GCM_IV_WRITEBACK) {
        memcpy(given->pIv, generated, length);
        return trace("C_EncryptInit", rv, 0);
    }
    pthread_mutex_lock(&fault_lock);
    pending_iv *slot = find_pending_locked(session);
    for (int i = 0; slot == NULL && i < FAULT_MAX_PENDING; i++) {
        if (!pending[i].used) {
            slot = &pending[i];
        }
    }
    if (slot != NULL) {
        slot->used = 1;
        slot->session = session;
        slot->length = length;
        memcpy(slot->iv, generated, length);
    }
    pthread_mutex_unlock(&fault_lock);
    return trace("C_EncryptInit", slot != NULL ? CKR_OK : CKR_DEVICE_MEMORY, 0);
}

static CK_RV fault_C_Encrypt(CK_SESSION_HANDLE session, CK_BYTE *data, CK_ULONG data_len,
                             CK_BYTE *encrypted_data, CK_ULONG *encrypted_data_len) {
    fault_action action = decide("C_Encrypt");
    if (action.inject_rv) {
        return trace("C_Encrypt", action.rv, 1);
    }
    pthread_mutex_lock(&fault_lock);
    pending_iv *slot = find_pending_locked(session);
    pending_iv appended;
    int append = slot != NULL;
    if (append) {
        appended = *slot;
    }
    pthread_mutex_unlock(&fault_lock);
    if (append && encrypted_data_len != NULL) {
        // Ciphertext and tag from the real module, then the IV. Too small a buffer keeps the
        // operation active, as the standard says.
        CK_ULONG needed = data_len + 16 + appended.length;
        if (encrypted_data == NULL || *encrypted_data_len < needed) {
            *encrypted_data_len = needed;
            return trace("C_Encrypt", encrypted_data == NULL ? CKR_OK : CKR_BUFFER_TOO_SMALL, 0);
        }
        CK_ULONG written = *encrypted_data_len - appended.length;
        CK_RV rv = real->C_Encrypt(session, data, data_len, encrypted_data, &written);
        if (rv == CKR_OK) {
            memcpy(encrypted_data + written, appended.iv, appended.length);
            *encrypted_data_len = written + appended.length;
            adjust_length(&action, 1, encrypted_data_len);
        }
        if (rv != CKR_BUFFER_TOO_SMALL) {
            pthread_mutex_lock(&fault_lock);
            pending_iv *done = find_pending_locked(session);
            if (done != NULL) {
                done->used = 0;
            }
            pthread_mutex_unlock(&fault_lock);
        }
        return trace("C_Encrypt", rv, 0);
    }
    CK_RV rv = real->C_Encrypt(session, data, data_len, encrypted_data, encrypted_data_len);
    if (rv == CKR_OK) {
        adjust_length(&action, encrypted_data != NULL, encrypted_data_len);
    }
    return trace("C_Encrypt", rv, 0);
}

static CK_RV fault_C_Decrypt(CK_SESSION_HANDLE session, CK_BYTE *encrypted_data,
                             CK_ULONG encrypted_data_len, CK_BYTE *data, CK_ULONG *data_len) {
    fault_action action = decide("C_Decrypt");
    if (action.inject_rv) {
        return trace("C_Decrypt", action.rv, 1);
    }
    CK_RV rv = real->C_Decrypt(session, encrypted_data, encrypted_data_len, data, data_len);
    if (rv == CKR_OK) {
        adjust_length(&action, data != NULL, data_len);
    }
    return trace("C_Decrypt", rv, 0);
}

static CK_RV fault_C_WrapKey(CK_SESSION_HANDLE session, CK_MECHANISM *mechanism,
                             CK_OBJECT_HANDLE wrapping_key, CK_OBJECT_HANDLE key, CK_BYTE *wrapped_key,
                             CK_ULONG *wrapped_key_len) {
    fault_action action = decide("C_WrapKey");
    if (action.inject_rv) {
        return trace("C_WrapKey", action.rv, 1);
    }
    CK_RV rv = real->C_WrapKey(session, mechanism, wrapping_key, key, wrapped_key, wrapped_key_len);
    if (rv == CKR_OK) {
        adjust_length(&action, wrapped_key != NULL, wrapped_key_len);
    }
    return trace("C_WrapKey", rv, 0);
}

static CK_FUNCTION_LIST fault_functions = {
    .version = {2, 40},
    .C_Initialize = fault_C_Initialize,
    .C_Finalize = fault_C_Finalize,
    .C_GetInfo = fault_C_GetInfo,
    .C_GetFunctionList = C_GetFunctionList,
    .C_GetSlotList = fault_C_GetSlotList,
    .C_GetSlotInfo = fault_C_GetSlotInfo,
    .C_GetTokenInfo = fault_C_GetTokenInfo,
    .C_GetMechanismList = fault_C_GetMechanismList,
    .C_GetMechanismInfo = fault_C_GetMechanismInfo,
    .C_InitToken = fault_C_InitToken,
    .C_InitPIN = fault_C_InitPIN,
    .C_SetPIN = fault_C_SetPIN,
    .C_OpenSession = fault_C_OpenSession,
    .C_CloseSession = fault_C_CloseSession,
    .C_CloseAllSessions = fault_C_CloseAllSessions,
    .C_GetSessionInfo = fault_C_GetSessionInfo,
    .C_GetOperationState = fault_C_GetOperationState,
    .C_SetOperationState = fault_C_SetOperationState,
    .C_Login = fault_C_Login,
    .C_Logout = fault_C_Logout,
    .C_CreateObject = fault_C_CreateObject,
    .C_CopyObject = fault_C_CopyObject,
    .C_DestroyObject = fault_C_DestroyObject,
    .C_GetObjectSize = fault_C_GetObjectSize,
    .C_GetAttributeValue = fault_C_GetAttributeValue,
    .C_SetAttributeValue = fault_C_SetAttributeValue,
    .C_FindObjectsInit = fault_C_FindObjectsInit,
    .C_FindObjects = fault_C_FindObjects,
    .C_FindObjectsFinal = fault_C_FindObjectsFinal,
    .C_EncryptInit = fault_C_EncryptInit,
    .C_Encrypt = fault_C_Encrypt,
    .C_EncryptUpdate = fault_C_EncryptUpdate,
    .C_EncryptFinal = fault_C_EncryptFinal,
    .C_DecryptInit = fault_C_DecryptInit,
    .C_Decrypt = fault_C_Decrypt,
    .C_DecryptUpdate = fault_C_DecryptUpdate,
    .C_DecryptFinal = fault_C_DecryptFinal,
    .C_DigestInit = fault_C_DigestInit,
    .C_Digest = fault_C_Digest,
    .C_DigestUpdate = fault_C_DigestUpdate,
    .C_DigestKey = fault_C_DigestKey,
    .C_DigestFinal = fault_C_DigestFinal,
    .C_SignInit = fault_C_SignInit,
    .C_Sign = fault_C_Sign,
    .C_SignUpdate = fault_C_SignUpdate,
    .C_SignFinal = fault_C_SignFinal,
    .C_SignRecoverInit = fault_C_SignRecoverInit,
    .C_SignRecover = fault_C_SignRecover,
    .C_VerifyInit = fault_C_VerifyInit,
    .C_Verify = fault_C_Verify,
    .C_VerifyUpdate = fault_C_VerifyUpdate,
    .C_VerifyFinal = fault_C_VerifyFinal,
    .C_VerifyRecoverInit = fault_C_VerifyRecoverInit,
    .C_VerifyRecover = fault_C_VerifyRecover,
    .C_DigestEncryptUpdate = fault_C_DigestEncryptUpdate,
    .C_DecryptDigestUpdate = fault_C_DecryptDigestUpdate,
    .C_SignEncryptUpdate = fault_C_SignEncryptUpdate,
    .C_DecryptVerifyUpdate = fault_C_DecryptVerifyUpdate,
    .C_GenerateKey = fault_C_GenerateKey,
    .C_GenerateKeyPair = fault_C_GenerateKeyPair,
    .C_WrapKey = fault_C_WrapKey,
    .C_UnwrapKey = fault_C_UnwrapKey,
    .C_DeriveKey = fault_C_DeriveKey,
    .C_SeedRandom = fault_C_SeedRandom,
    .C_GenerateRandom = fault_C_GenerateRandom,
    .C_GetFunctionStatus = fault_C_GetFunctionStatus,
    .C_CancelFunction = fault_C_CancelFunction,
    .C_WaitForSlotEvent = fault_C_WaitForSlotEvent,
};

// The one exported symbol. Loads the real module on first use.
__attribute__((visibility("default"))) CK_RV C_GetFunctionList(CK_FUNCTION_LIST **list) {
    if (list == NULL) {
        return CKR_ARGUMENTS_BAD;
    }
    pthread_mutex_lock(&fault_lock);
    if (real == NULL) {
        const char *path = getenv("HSMGW_FAULT_MODULE");
        if (path == NULL) {
            pthread_mutex_unlock(&fault_lock);
            fprintf(stderr, "hsmgw_fault_pkcs11: HSMGW_FAULT_MODULE is not set\n");
            return CKR_GENERAL_ERROR;
        }
        void *library = dlopen(path, RTLD_NOW | RTLD_LOCAL);
        CK_C_GetFunctionList get = library != NULL ? (CK_C_GetFunctionList)dlsym(library, "C_GetFunctionList") : NULL;
        if (get == NULL || get(&real) != CKR_OK || real == NULL) {
            real = NULL;
            pthread_mutex_unlock(&fault_lock);
            fprintf(stderr, "hsmgw_fault_pkcs11: cannot load %s: %s\n", path, library == NULL ? dlerror() : "no function list");
            return CKR_GENERAL_ERROR;
        }
        // Copied once, so later changes to the environment do not move the files under a test.
        const char *control = getenv("HSMGW_FAULT_CONTROL");
        const char *tracefile = getenv("HSMGW_FAULT_TRACE");
        control_path = control != NULL ? strdup(control) : NULL;
        trace_path = tracefile != NULL ? strdup(tracefile) : NULL;
    }
    pthread_mutex_unlock(&fault_lock);
    *list = &fault_functions;
    return CKR_OK;
}
