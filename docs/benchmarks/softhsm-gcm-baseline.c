/* Calibration for docs/benchmarks.md: AES-256-GCM of 32 bytes straight through SoftHSM2's C API,
 * one thread, C_EncryptInit+C_Encrypt and C_DecryptInit+C_Decrypt, 3 s each, with a session-object
 * key and with a token-object key made like a gateway master key. It shows what the Swift wrapper
 * (hsm-bench) adds on top. Not part of the product; build and run it as docs/benchmarks.md says.
 */
#include <p11-kit-1/p11-kit/pkcs11.h>
#include <dlfcn.h>
#include <stdio.h>
#include <string.h>
#include <time.h>
static double now(){struct timespec t;clock_gettime(CLOCK_MONOTONIC,&t);return t.tv_sec+t.tv_nsec/1e9;}
int main(int argc,char**argv){
void*h=dlopen("/usr/lib/softhsm/libsofthsm2.so",RTLD_NOW);
CK_C_GetFunctionList g=(CK_C_GetFunctionList)dlsym(h,"C_GetFunctionList");CK_FUNCTION_LIST_PTR f;g(&f);
CK_C_INITIALIZE_ARGS ia={0};ia.flags=CKF_OS_LOCKING_OK;printf("init %lx\n",f->C_Initialize(&ia));
CK_SLOT_ID slots[10];CK_ULONG n=10;f->C_GetSlotList(CK_TRUE,slots,&n);
CK_SLOT_ID s=slots[0];unsigned char so[]="so-pin-1234",pin[]="1234";unsigned char label[32];memset(label,' ',32);memcpy(label,"cb",2);
printf("inittoken %lx\n",f->C_InitToken(s,so,11,label));
n=10;f->C_GetSlotList(CK_TRUE,slots,&n);CK_TOKEN_INFO ti;for(CK_ULONG i=0;i<n;i++){f->C_GetTokenInfo(slots[i],&ti);if(!memcmp(ti.label,"cb ",3)){s=slots[i];}}
CK_SESSION_HANDLE se;f->C_OpenSession(s,CKF_SERIAL_SESSION|CKF_RW_SESSION,0,0,&se);
f->C_Login(se,CKU_SO,so,11);f->C_InitPIN(se,pin,4);f->C_Logout(se);printf("login %lx\n",f->C_Login(se,CKU_USER,pin,4));
for(int tok=0;tok<2;tok++){
CK_OBJECT_CLASS c=CKO_SECRET_KEY;CK_KEY_TYPE kt=CKK_AES;CK_ULONG len=32;CK_BBOOL t=CK_TRUE,fa=CK_FALSE,tokv=tok?CK_TRUE:CK_FALSE;
CK_ATTRIBUTE tmpl[]={{CKA_CLASS,&c,sizeof c},{CKA_KEY_TYPE,&kt,sizeof kt},{CKA_VALUE_LEN,&len,sizeof len},{CKA_TOKEN,&tokv,1},{CKA_PRIVATE,&t,1},{CKA_SENSITIVE,&t,1},{CKA_EXTRACTABLE,&fa,1},{CKA_ENCRYPT,&t,1},{CKA_DECRYPT,&t,1},{CKA_MODIFIABLE,&fa,1}};
CK_MECHANISM km={CKM_AES_KEY_GEN,0,0};CK_OBJECT_HANDLE k;printf("gen %lx\n",f->C_GenerateKey(se,&km,tmpl,10,&k));
unsigned char iv[12]={0},aad[5]="bench",pt[32]={0},ct[48],out[48];
CK_GCM_PARAMS gp={iv,12,96,aad,5,128};CK_MECHANISM m={CKM_AES_GCM,&gp,sizeof gp};
double t0=now();long cnt=0;while(now()-t0<3){iv[11]++;CK_ULONG ol=48;f->C_EncryptInit(se,&m,k);f->C_Encrypt(se,pt,32,ct,&ol);cnt++;}
double e=cnt/(now()-t0);
t0=now();long d=0;CK_RV rv=0;while(now()-t0<3){CK_ULONG ol=48;f->C_DecryptInit(se,&m,k);rv=f->C_Decrypt(se,ct,48,out,&ol);d++;}
printf("%s key: encrypt %.0f/s decrypt %.0f/s (rv %lx)\n",tok?"token":"session",e,d/(now()-t0),rv);
}
return 0;}
