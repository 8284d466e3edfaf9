/*
 * The stack lab's guest payload: a freestanding multiboot v1 program that libvirt
 * starts with <os><kernel> in place of a guest operating system.
 *
 * Why no guest kernel: under emulation (TCG inside TCG) a guest Linux would spend
 * minutes booting and its own page cache and scheduler would blur what the host
 * sees. This program does only what the lab measures: it first-touches every 4 KiB
 * page of its RAM above 4 MiB, then writes pages forever, HOT_ACCESS_PCT % of the
 * writes into a hot set of known guest-physical pages and the rest uniformly over
 * all of its RAM, exactly as tests/src/bin/fake_qemu.rs does, so the harness can
 * compute access-weighted locality from the same known split (tests/src/lab/access.rs).
 *
 * Parameters come from the multiboot command line (libvirt <cmdline>), integers:
 *   ram_mib=256 hot_permille=250 hot_offset_permille=250 hot_access_pct=95 duty_pct=100
 * ram_mib is the configured RAM (the domain's <memory>): the hot set is placed
 * within it by the same rounding as the harness's hot_pages(), whatever part of it
 * the firmware reserves at the top.
 * A duty cycle below 100 alternates work and spinning on the time-stamp counter in
 * periods of PERIOD_TSC ticks (the vCPU stays busy to the host either way only if
 * duty is 100; spinning on `pause` costs the host less under TCG than writing).
 *
 * The harness reads the state block at STATE_GPA through /proc/PID/mem of qemu:
 * guest-physical address X below 3 GiB is the start of the guest RAM mapping + X
 * on qemu's pc and q35 machines.
 */

typedef unsigned int u32;
typedef unsigned long long u64;

#define MB_MAGIC 0x1BADB002u
#define MB_FLAGS 0x00000003u /* page-aligned modules, memory information */

__attribute__((section(".multiboot"), used, aligned(4)))
static const u32 multiboot_header[3] = {MB_MAGIC, MB_FLAGS, -(MB_MAGIC + MB_FLAGS)};

#define STATE_GPA 0x200000u
#define TOUCH_FROM 0x400000u
#define PAGE 4096u
#define STATE_MAGIC 0x564d424cu /* "VMBL" */
#define PERIOD_TSC 50000000ull
#define PERIOD_TSC_PER_PCT (PERIOD_TSC / 100u)

/* Read by the harness: keep the layout in step with the harness's guest state reader. */
struct state {
    volatile u32 magic;
    volatile u32 ready;       /* 1 once every page was first-touched */
    volatile u64 touches;     /* writes done since ready */
    volatile u32 mem_top;     /* one past the last byte of RAM used */
    volatile u32 hot_start;   /* guest-physical hot set [hot_start, hot_end) */
    volatile u32 hot_end;
};

struct mb_info {
    u32 flags, mem_lower, mem_upper, boot_device, cmdline;
};

static u32 parse(const char *s, const char *key, u32 fallback)
{
    if (!s)
        return fallback;
    for (const char *p = s; *p; p++) {
        const char *k = key, *q = p;
        while (*k && *q == *k) {
            k++;
            q++;
        }
        if (*k == 0 && *q == '=' && (p == s || p[-1] == ' ')) {
            u32 v = 0;
            for (q++; *q >= '0' && *q <= '9'; q++)
                v = v * 10 + (u32)(*q - '0');
            return v;
        }
    }
    return fallback;
}

static inline u64 rdtsc(void)
{
    u32 lo, hi;
    __asm__ volatile("rdtsc" : "=a"(lo), "=d"(hi));
    return ((u64)hi << 32) | lo;
}

static u32 rng = 2463534242u;
static inline u32 next(void)
{
    rng ^= rng << 13;
    rng ^= rng >> 17;
    rng ^= rng << 5;
    return rng;
}

void payload_main(u32 magic, struct mb_info *mbi)
{
    struct state *st = (struct state *)STATE_GPA;
    const char *cmdline = 0;
    u32 top = 64u << 20;
    if (magic == 0x2BADB002u) {
        if (mbi->flags & 1u)
            top = (1u << 20) + mbi->mem_upper * 1024u;
        if (mbi->flags & 4u)
            cmdline = (const char *)mbi->cmdline;
    }
    u32 hot_permille = parse(cmdline, "hot_permille", 250);
    u32 hot_offset_permille = parse(cmdline, "hot_offset_permille", 0);
    u32 hot_access_pct = parse(cmdline, "hot_access_pct", 95);
    u32 duty_pct = parse(cmdline, "duty_pct", 100);
    if (hot_permille > 1000)
        hot_permille = 1000;
    if (hot_offset_permille > 1000)
        hot_offset_permille = 1000;
    /* The same rounding as the harness's hot_pages(): pages of all RAM from 0. */
    u32 ram_mib = parse(cmdline, "ram_mib", top >> 20);
    u32 pages = ram_mib * (1024u * 1024u / PAGE);
    u32 usable = top / PAGE;
    u32 hot_len = pages * hot_permille / 1000u; /* pages < 2^20: no overflow */
    if (hot_len < 1)
        hot_len = 1;
    u32 hot_first = pages * hot_offset_permille / 1000u;
    if (hot_first > pages - hot_len)
        hot_first = pages - hot_len;
    rng ^= top;

    st->ready = 0;
    st->touches = 0;
    st->mem_top = top;
    st->hot_start = hot_first * PAGE;
    st->hot_end = (hot_first + hot_len) * PAGE;
    st->magic = STATE_MAGIC;
    for (u32 a = TOUCH_FROM; a < top; a += PAGE)
        *(volatile u32 *)a = a;
    st->ready = 1;

    u32 low = TOUCH_FROM / PAGE;
    u64 period_start = rdtsc();
    for (;;) {
        for (u32 i = 0; i < 4096; i++) {
            u32 r = next();
            u32 page;
            if (r % 100u < hot_access_pct)
                page = hot_first + next() % hot_len;
            else
                page = next() % pages;
            if (page < low)
                page += low; /* below 4 MiB is this program and the BIOS's */
            if (page >= usable)
                page = usable - 1;
            *(volatile u32 *)(page * PAGE + (r & 0xffcu)) = r;
        }
        st->touches += 4096;
        if (duty_pct < 100) {
            u64 now = rdtsc();
            if (now - period_start >= PERIOD_TSC_PER_PCT * duty_pct) {
                while (rdtsc() - period_start < PERIOD_TSC)
                    __asm__ volatile("pause");
                period_start = rdtsc();
            }
        }
    }
}

/* Multiboot entry: EAX = magic, EBX = info; paging off, no stack. */
__asm__(".pushsection .text\n"
        ".global _start\n"
        "_start:\n"
        "  mov $stack_top, %esp\n"
        "  push %ebx\n"
        "  push %eax\n"
        "  call payload_main\n"
        "1: hlt\n"
        "  jmp 1b\n"
        ".popsection\n"
        ".pushsection .bss\n"
        ".align 16\n"
        "  .skip 16384\n"
        "stack_top:\n"
        ".popsection\n");
