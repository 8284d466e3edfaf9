/*
 * The stack lab's guest payload: a freestanding multiboot v1 program that libvirt
 * starts with <os><kernel> in place of a guest operating system.
 *
 * Why no guest kernel: under emulation (TCG inside TCG) a guest Linux would spend
 * minutes booting and its own page cache and scheduler would blur what the host
 * sees. This program does only what the lab measures: it first-touches every 4 KiB
 * page of its RAM above 4 MiB, then writes pages forever, HOT_ACCESS_PCT % of the
 * writes into a hot set of known guest-physical pages and the rest uniformly over
 * its RAM, exactly as tests/src/bin/fake_qemu.rs does, so the harness can compute
 * access-weighted locality from the same known split (tests/src/lab/access.rs).
 *
 * Parameters come from the multiboot command line (libvirt <cmdline>), integers:
 *   ram_mib=256 hot_permille=250 hot_offset_permille=250 hot_access_pct=95 duty_pct=100
 *   cpus=1 cells=1
 * ram_mib is the configured RAM (the domain's <memory>): the hot set is placed
 * within it by the same rounding as the harness's hot_pages(), whatever part of it
 * the firmware reserves at the top.
 * A duty cycle below 100 alternates work and halting in periods of PERIOD_TSC
 * time-stamp counter ticks: the vCPU rests in `hlt`, as an idle guest kernel does, so
 * its thread sleeps on the host and a quiet VM is quiet to the balancers. A local
 * APIC timer (every TIMER_NS) wakes it to look at the clock; the vCPU sets up its
 * interrupt table and timer the first time it rests, so a VM always at 100 % never
 * takes an interrupt. The duty cycle is a word of the state block (`duty_pct`): the
 * command line sets it at start and the harness may write it later, which is how a
 * scenario's load phases reach a domain.
 *
 * Every vCPU, or the boot vCPU only: with cpus=N (N > 1) the boot vCPU starts the
 * others (INIT and STARTUP IPIs from its local APIC to all but itself, the way a
 * kernel brings up a PC's application processors) and all N write. A vCPU's index
 * is its initial APIC ID, which is qemu's vCPU index for the topology libvirt gives a
 * domain without <topology> (one core per socket).
 *
 * Guest NUMA cells: with cells=C (libvirt <cpu><numa><cell/>, C cells of equal
 * size and vCPU count, in order), vCPU i belongs to cell i / (N / C) and writes only
 * its own cell's guest-physical range, with a hot set of its own placed in the cell
 * as hot_pages() places one in a mapping of the cell's size: a guest OS that knows
 * its NUMA layout keeps each vCPU's work in its own cell's memory. qemu backs each
 * cell with its own host mapping, and anonymous mappings carry no name, so each cell
 * c > 0 carries a marker at its base + STATE_GPA (CELL_MAGIC, c) by which the harness
 * tells which mapping is which cell; cell 0's is the state block itself. No vCPU
 * writes those pages.
 *
 * The harness reads the state block at STATE_GPA through /proc/PID/mem of qemu:
 * guest-physical address X of cell c below 3 GiB is the start of that cell's RAM
 * mapping + (X - the cell's base) on qemu's pc and q35 machines.
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
#define CELL_MAGIC 0x4c4c4543u  /* "CELL" */
/* A duty period: about half a second at the 2-3 GHz of the time-stamp counter a
 * guest of qemu's TCG reads (the host's). The busy part is timed per CHUNK writes,
 * which take milliseconds under emulation inside emulation: far shorter than the
 * busy part of a 5 % duty cycle. */
#define PERIOD_TSC 1000000000ull
#define CHUNK 256u
/* How long the boot vCPU waits for the others to come up: a few seconds. */
#define AP_WAIT_TSC 10000000000ull
#define TIMER_NS 2000000u
#define PERIOD_TSC_PER_PCT (PERIOD_TSC / 100u)
#define MAX_CPUS 16u
#define AP_STACK 16384u
/* Where the application processors start in real mode: a free page of low memory,
 * given to them as the STARTUP IPI's vector (the page number). */
#define TRAMPOLINE 0x8000u
#define LAPIC_ICR_LOW 0xfee00300u
#define LAPIC_ICR_HIGH 0xfee00310u
#define ICR_PENDING (1u << 12)
#define ICR_ALL_BUT_SELF_INIT 0x000c4500u
#define ICR_ALL_BUT_SELF_STARTUP 0x000c4600u
#define LAPIC_EOI 0xfee000b0u
#define LAPIC_SVR 0xfee000f0u
#define LAPIC_LVT_TIMER 0xfee00320u
#define LAPIC_TIMER_INITIAL 0xfee00380u
#define LAPIC_TIMER_DIVIDE 0xfee003e0u
#define SVR_ENABLE (1u << 8)
#define LVT_PERIODIC (1u << 17)
#define DIVIDE_BY_1 0xbu
#define TIMER_VECTOR 0x20u
#define SPURIOUS_VECTOR 0xffu

/* Read by the harness: keep the layout in step with the harness's guest state reader
 * (tests/src/bin/lab_harness/domains.rs). */
struct state {
    volatile u32 magic;
    volatile u32 ready;       /* 1 once every page was first-touched */
    volatile u64 touches;     /* the boot vCPU's writes since ready */
    volatile u32 mem_top;     /* one past the last byte of RAM used */
    volatile u32 hot_start;   /* the boot vCPU's hot set [hot_start, hot_end) */
    volatile u32 hot_end;
    volatile u32 cpus_running; /* vCPUs writing (offset 28) */
    volatile u64 cpu_touches[MAX_CPUS]; /* writes per vCPU index (offset 32) */
    volatile u32 duty_pct;    /* the duty cycle now, 1..100 (offset 160) */
};

struct cell_marker {
    volatile u32 magic;
    volatile u32 id;
};

struct mb_info {
    u32 flags, mem_lower, mem_upper, boot_device, cmdline;
};

/* What every vCPU needs, set by the boot vCPU before it starts the others. */
static struct {
    u32 pages;        /* guest RAM in pages, from ram_mib */
    u32 usable;       /* pages below the firmware's top of RAM */
    u32 cells;        /* >= 1 */
    u32 cpus;         /* vCPUs that write, >= 1 */
    u32 hot_permille, hot_offset_permille, hot_access_pct;
} cfg;

/* Application processors take a stack each by this counter (the boot vCPU is 0). */
volatile u32 ap_next = 1;
__attribute__((aligned(16))) unsigned char ap_stacks[MAX_CPUS * AP_STACK];

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

/* This vCPU's initial APIC ID (CPUID leaf 1, EBX bits 31:24). */
static inline u32 apic_id(void)
{
    u32 a = 1, b, c = 0, d;
    __asm__ volatile("cpuid" : "+a"(a), "=b"(b), "+c"(c), "=d"(d));
    return b >> 24;
}

static inline u32 next(u32 *rng)
{
    u32 x = *rng;
    x ^= x << 13;
    x ^= x >> 17;
    x ^= x << 5;
    return *rng = x;
}

static inline void outb(unsigned short port, unsigned char v)
{
    __asm__ volatile("outb %0, %1" : : "a"(v), "Nd"(port));
}

/* The interrupt table every vCPU loads before it first rests: the APIC timer's
 * vector and the APIC's spurious one; nothing else can arrive (the legacy PICs are
 * masked). Gates are 32-bit interrupt gates on the flat code segment 0x08. */
static u64 idt[256] __attribute__((aligned(8)));
static struct {
    unsigned short limit;
    u32 base;
} __attribute__((packed)) idtr;
extern void timer_isr(void), spurious_isr(void);

static void set_gate(u32 vector, void (*handler)(void))
{
    u32 a = (u32)handler;
    idt[vector] = (a & 0xffffu) | (0x08u << 16) | ((u64)0x8e << 40) | ((u64)(a >> 16) << 48);
}

/* Once per vCPU, before its first rest: interrupts on, a periodic APIC timer. */
static void start_timer(void)
{
    if (idtr.limit == 0) { /* the first vCPU to rest fills the shared table */
        set_gate(TIMER_VECTOR, timer_isr);
        set_gate(SPURIOUS_VECTOR, spurious_isr);
        idtr.base = (u32)idt;
        idtr.limit = sizeof(idt) - 1;
    }
    __asm__ volatile("lidt %0" : : "m"(idtr));
    outb(0x21, 0xff); /* legacy PICs masked: their vectors have no gate here */
    outb(0xa1, 0xff);
    *(volatile u32 *)LAPIC_SVR = SVR_ENABLE | SPURIOUS_VECTOR;
    *(volatile u32 *)LAPIC_TIMER_DIVIDE = DIVIDE_BY_1;
    *(volatile u32 *)LAPIC_LVT_TIMER = LVT_PERIODIC | TIMER_VECTOR;
    *(volatile u32 *)LAPIC_TIMER_INITIAL = TIMER_NS; /* qemu's APIC: 1 tick = 1 ns */
}

static void spin(u32 n)
{
    for (volatile u32 i = 0; i < n; i++)
        __asm__ volatile("pause");
}

/* The first page of cell `c` (cells split RAM evenly, as the domain XML does). */
static u32 cell_first(u32 c)
{
    return cfg.pages / cfg.cells * c;
}

/* Whether guest page `p` is a cell marker no vCPU may write. */
static int is_marker(u32 p)
{
    u32 per = cfg.pages / cfg.cells;
    return cfg.cells > 1 && p >= per && p % per == STATE_GPA / PAGE;
}

/* The writer of vCPU `idx`, forever. */
static void work(u32 idx)
{
    struct state *st = (struct state *)STATE_GPA;
    u32 per_cpu = cfg.cpus / cfg.cells;
    u32 cell = per_cpu ? idx / per_cpu : 0;
    if (cell >= cfg.cells)
        cell = cfg.cells - 1;
    u32 base = cell_first(cell);
    u32 pages = cfg.pages / cfg.cells;
    /* The same rounding as the harness's hot_pages(), within the cell. */
    u32 hot_len = pages * cfg.hot_permille / 1000u; /* pages < 2^20: no overflow */
    if (hot_len < 1)
        hot_len = 1;
    u32 hot_first = pages * cfg.hot_offset_permille / 1000u;
    if (hot_first > pages - hot_len)
        hot_first = pages - hot_len;
    u32 low = TOUCH_FROM / PAGE;
    u32 rng = 2463534242u ^ (idx * 0x9e3779b9u) ^ cfg.usable;
    if (idx == 0) {
        st->hot_start = (base + hot_first) * PAGE;
        st->hot_end = (base + hot_first + hot_len) * PAGE;
    }
    u64 period_start = rdtsc();
    int timer_on = 0;
    for (;;) {
        for (u32 i = 0; i < CHUNK; i++) {
            u32 r = next(&rng);
            u32 page;
            if (r % 100u < cfg.hot_access_pct)
                page = base + hot_first + next(&rng) % hot_len;
            else
                page = base + next(&rng) % pages;
            if (page < low)
                page += low; /* below 4 MiB is this program and the BIOS's */
            if (is_marker(page))
                page++;
            if (page >= cfg.usable)
                page = cfg.usable - 1;
            *(volatile u32 *)(page * PAGE + (r & 0xffcu)) = r;
        }
        st->cpu_touches[idx] += CHUNK;
        if (idx == 0)
            st->touches += CHUNK;
        u32 duty = st->duty_pct;
        if (duty < 100) {
            u64 now = rdtsc();
            if (now - period_start >= PERIOD_TSC_PER_PCT * duty) {
                if (!timer_on) {
                    start_timer();
                    timer_on = 1;
                }
                while (rdtsc() - period_start < PERIOD_TSC)
                    __asm__ volatile("sti; hlt; cli");
                period_start = rdtsc();
            }
        }
    }
}

/* An application processor, in protected mode on its own stack (ap_entry below). */
void ap_main(void)
{
    struct state *st = (struct state *)STATE_GPA;
    u32 idx = apic_id();
    if (idx >= cfg.cpus)
        for (;;)
            __asm__ volatile("cli; hlt");
    __atomic_fetch_add(&st->cpus_running, 1, __ATOMIC_SEQ_CST);
    work(idx);
}

extern const unsigned char ap_tramp_start[], ap_tramp_end[];

static void send_ipi(u32 command)
{
    volatile u32 *high = (volatile u32 *)LAPIC_ICR_HIGH;
    volatile u32 *low = (volatile u32 *)LAPIC_ICR_LOW;
    *high = 0;
    *low = command;
    while (*low & ICR_PENDING)
        __asm__ volatile("pause");
}

/* Starts the other vCPUs at TRAMPOLINE and waits (bounded) until they all write. */
static void start_aps(void)
{
    struct state *st = (struct state *)STATE_GPA;
    unsigned char *to = (unsigned char *)TRAMPOLINE;
    for (const unsigned char *p = ap_tramp_start; p < ap_tramp_end; p++)
        *to++ = *p;
    send_ipi(ICR_ALL_BUT_SELF_INIT);
    spin(100000);
    for (int i = 0; i < 2; i++) {
        send_ipi(ICR_ALL_BUT_SELF_STARTUP | (TRAMPOLINE >> 12));
        spin(10000);
    }
    /* Not forever: a vCPU that never comes up leaves cpus_running short, which the
     * harness reports, instead of a VM that does no work at all. */
    u64 since = rdtsc();
    while (st->cpus_running < cfg.cpus && rdtsc() - since < AP_WAIT_TSC)
        __asm__ volatile("pause");
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
    cfg.hot_permille = parse(cmdline, "hot_permille", 250);
    cfg.hot_offset_permille = parse(cmdline, "hot_offset_permille", 0);
    cfg.hot_access_pct = parse(cmdline, "hot_access_pct", 95);
    u32 duty_pct = parse(cmdline, "duty_pct", 100);
    cfg.cpus = parse(cmdline, "cpus", 1);
    cfg.cells = parse(cmdline, "cells", 1);
    if (cfg.hot_permille > 1000)
        cfg.hot_permille = 1000;
    if (cfg.hot_offset_permille > 1000)
        cfg.hot_offset_permille = 1000;
    if (cfg.cpus < 1 || cfg.cpus > MAX_CPUS)
        cfg.cpus = 1;
    if (cfg.cells < 1 || cfg.cells > cfg.cpus)
        cfg.cells = 1;
    u32 ram_mib = parse(cmdline, "ram_mib", top >> 20);
    cfg.pages = ram_mib * (1024u * 1024u / PAGE);
    cfg.usable = top / PAGE;

    st->ready = 0;
    st->touches = 0;
    st->duty_pct = duty_pct < 1 ? 1 : duty_pct > 100 ? 100 : duty_pct;
    st->cpus_running = 1;
    for (u32 i = 0; i < MAX_CPUS; i++)
        st->cpu_touches[i] = 0;
    st->mem_top = top;
    st->magic = STATE_MAGIC;
    for (u32 a = TOUCH_FROM; a < top; a += PAGE)
        *(volatile u32 *)a = a;
    for (u32 c = 1; c < cfg.cells; c++) {
        struct cell_marker *m = (struct cell_marker *)(cell_first(c) * PAGE + STATE_GPA);
        if (cell_first(c) * PAGE + STATE_GPA < top) {
            m->id = c;
            m->magic = CELL_MAGIC;
        }
    }
    st->ready = 1;
    if (cfg.cpus > 1)
        start_aps();
    work(0);
}

/* Multiboot entry: EAX = magic, EBX = info; paging off, no stack. */
__asm__(".pushsection .text\n"
        ".global _start\n"
        "_start:\n"
        "  lgdt ap_gdtr\n" /* the loader's GDT is not ours to keep: CS 0x08 as the APs */
        "  ljmp $0x08, $1f\n"
        "1:\n"
        "  mov $0x10, %cx\n" /* EAX and EBX hold the loader's magic and info */
        "  mov %cx, %ds\n"
        "  mov %cx, %es\n"
        "  mov %cx, %ss\n"
        "  mov %cx, %fs\n"
        "  mov %cx, %gs\n"
        "  mov $stack_top, %esp\n"
        "  push %ebx\n"
        "  push %eax\n"
        "  call payload_main\n"
        "2: hlt\n"
        "  jmp 2b\n"
        /* The APIC timer: acknowledge and return (the rest loop reads the clock). */
        "timer_isr:\n"
        "  movl $0, 0xfee000b0\n"
        "  iret\n"
        "spurious_isr:\n"
        "  iret\n"
        ".popsection\n"
        ".pushsection .bss\n"
        ".align 16\n"
        "  .skip 16384\n"
        "stack_top:\n"
        ".popsection\n");

/* An application processor's start, copied to TRAMPOLINE: it wakes in real mode at
 * TRAMPOLINE >> 4 : 0, loads the flat GDT below, enters protected mode, takes a
 * stack of ap_stacks by ap_next and calls ap_main. Only the real-mode part runs from
 * the copy (so it addresses by offsets from ap_tramp_start); the far jump lands on
 * ap_entry in the payload itself. */
__asm__(".pushsection .text\n"
        ".global ap_tramp_start, ap_tramp_end\n"
        ".code16\n"
        "ap_tramp_start:\n"
        "  cli\n"
        "  mov %cs, %ax\n"
        "  mov %ax, %ds\n"
        "  lgdtl ap_gdtr - ap_tramp_start\n"
        "  mov %cr0, %eax\n"
        "  or $1, %eax\n"
        "  mov %eax, %cr0\n"
        "  ljmpl $0x08, $ap_entry\n"
        ".align 4\n"
        "ap_gdtr:\n"
        "  .word ap_gdt_end - ap_gdt - 1\n"
        "  .long ap_gdt\n"
        "ap_tramp_end:\n"
        ".code32\n"
        "ap_entry:\n"
        "  mov $0x10, %ax\n"
        "  mov %ax, %ds\n"
        "  mov %ax, %es\n"
        "  mov %ax, %ss\n"
        "  mov %ax, %fs\n"
        "  mov %ax, %gs\n"
        "  mov $1, %ecx\n"
        "  lock xadd %ecx, ap_next\n"
        "  inc %ecx\n"
        "  shl $14, %ecx\n"
        "  lea ap_stacks(%ecx), %esp\n"
        "  call ap_main\n"
        "2: hlt\n"
        "  jmp 2b\n"
        ".popsection\n"
        ".pushsection .data\n"
        ".align 8\n"
        "ap_gdt:\n"
        "  .quad 0\n"
        "  .quad 0x00cf9a000000ffff\n"
        "  .quad 0x00cf92000000ffff\n"
        "ap_gdt_end:\n"
        ".popsection\n");
