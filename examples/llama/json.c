/* Recursive-descent JSON parser (RFC 8259) with a depth limit, so that a
 * hostile file cannot exhaust the stack. */
#include "json.h"

#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define JSON_MAX_DEPTH 64

typedef struct parser {
    const char *s;
    size_t len, pos;
    char *err;
    size_t errlen;
    int failed;
} parser;

static void fail(parser *p, const char *what)
{
    if (!p->failed && p->err && p->errlen)
        snprintf(p->err, p->errlen, "JSON: %s at byte %zu", what, p->pos);
    p->failed = 1;
}

static void skip_ws(parser *p)
{
    while (p->pos < p->len && (p->s[p->pos] == ' ' || p->s[p->pos] == '\t' ||
                               p->s[p->pos] == '\n' || p->s[p->pos] == '\r'))
        p->pos++;
}

static void free_members(json_value *v)
{
    size_t i;
    if (!v)
        return;
    free(v->string);
    for (i = 0; i < v->count; i++) {
        if (v->keys)
            free(v->keys[i]);
        if (v->items)
            free_members(&v->items[i]);
    }
    free(v->keys);
    free(v->items);
}

static int hexval(char c)
{
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    if (c >= 'A' && c <= 'F') return c - 'A' + 10;
    return -1;
}

static int put_utf8(char *out, size_t *n, uint32_t cp)
{
    if (cp < 0x80) { out[(*n)++] = (char)cp; }
    else if (cp < 0x800) {
        out[(*n)++] = (char)(0xC0 | (cp >> 6));
        out[(*n)++] = (char)(0x80 | (cp & 0x3F));
    } else if (cp < 0x10000) {
        out[(*n)++] = (char)(0xE0 | (cp >> 12));
        out[(*n)++] = (char)(0x80 | ((cp >> 6) & 0x3F));
        out[(*n)++] = (char)(0x80 | (cp & 0x3F));
    } else {
        out[(*n)++] = (char)(0xF0 | (cp >> 18));
        out[(*n)++] = (char)(0x80 | ((cp >> 12) & 0x3F));
        out[(*n)++] = (char)(0x80 | ((cp >> 6) & 0x3F));
        out[(*n)++] = (char)(0x80 | (cp & 0x3F));
    }
    return 0;
}

static int read_hex4(parser *p, uint32_t *cp)
{
    int i;
    *cp = 0;
    if (p->len - p->pos < 4) { fail(p, "truncated \\u escape"); return -1; }
    for (i = 0; i < 4; i++) {
        int h = hexval(p->s[p->pos + i]);
        if (h < 0) { fail(p, "bad \\u escape"); return -1; }
        *cp = *cp * 16 + (uint32_t)h;
    }
    p->pos += 4;
    return 0;
}

/* At the opening quote. Unescaped text is never longer than the source. */
static char *parse_string(parser *p)
{
    size_t start = ++p->pos, n = 0, end = start;
    char *out;
    while (end < p->len && p->s[end] != '"') {
        if (p->s[end] == '\\')
            end++;
        end++;
    }
    if (end >= p->len) { fail(p, "unterminated string"); return NULL; }
    out = malloc(end - start + 1);
    if (!out) { fail(p, "out of memory"); return NULL; }
    while (p->pos < end) {
        char c = p->s[p->pos++];
        if ((unsigned char)c < 0x20) { fail(p, "control character in string"); free(out); return NULL; }
        if (c != '\\') { out[n++] = c; continue; }
        c = p->s[p->pos++];
        switch (c) {
        case '"': out[n++] = '"'; break;
        case '\\': out[n++] = '\\'; break;
        case '/': out[n++] = '/'; break;
        case 'b': out[n++] = '\b'; break;
        case 'f': out[n++] = '\f'; break;
        case 'n': out[n++] = '\n'; break;
        case 'r': out[n++] = '\r'; break;
        case 't': out[n++] = '\t'; break;
        case 'u': {
            uint32_t cp;
            /* \uXXXX is 6 source bytes, at most 3 UTF-8 bytes (4 for a pair
             * of 12 source bytes): the buffer suffices. */
            if (p->pos > end || read_hex4(p, &cp)) { free(out); if (!p->failed) fail(p, "bad escape"); return NULL; }
            if (cp >= 0xD800 && cp < 0xDC00 && p->pos + 6 <= end &&
                p->s[p->pos] == '\\' && p->s[p->pos + 1] == 'u') {
                uint32_t lo;
                p->pos += 2;
                if (read_hex4(p, &lo)) { free(out); return NULL; }
                if (lo >= 0xDC00 && lo < 0xE000)
                    cp = 0x10000 + ((cp - 0xD800) << 10) + (lo - 0xDC00);
            }
            put_utf8(out, &n, cp);
            break;
        }
        default: fail(p, "bad escape"); free(out); return NULL;
        }
    }
    if (p->pos > end) { fail(p, "bad escape"); free(out); return NULL; }
    p->pos = end + 1;
    out[n] = '\0';
    return out;
}

static int parse_value(parser *p, json_value *v, int depth);

static int grow(parser *p, json_value *v, size_t *cap, int with_keys)
{
    if (v->count < *cap)
        return 0;
    size_t nc = *cap ? *cap * 2 : 4;
    json_value *ni = realloc(v->items, nc * sizeof *ni);
    if (!ni) { fail(p, "out of memory"); return -1; }
    v->items = ni;
    if (with_keys) {
        char **nk = realloc(v->keys, nc * sizeof *nk);
        if (!nk) { fail(p, "out of memory"); return -1; }
        v->keys = nk;
    }
    *cap = nc;
    return 0;
}

static int parse_value(parser *p, json_value *v, int depth)
{
    memset(v, 0, sizeof *v);
    if (depth > JSON_MAX_DEPTH) { fail(p, "nesting too deep"); return -1; }
    skip_ws(p);
    if (p->pos >= p->len) { fail(p, "unexpected end"); return -1; }
    char c = p->s[p->pos];
    if (c == '{' || c == '[') {
        int obj = c == '{';
        size_t cap = 0;
        v->type = obj ? JSON_OBJECT : JSON_ARRAY;
        p->pos++;
        skip_ws(p);
        if (p->pos < p->len && p->s[p->pos] == (obj ? '}' : ']')) { p->pos++; return 0; }
        for (;;) {
            char *key = NULL;
            skip_ws(p);
            if (obj) {
                if (p->pos >= p->len || p->s[p->pos] != '"') { fail(p, "expected a key"); return -1; }
                if (!(key = parse_string(p))) return -1;
                skip_ws(p);
                if (p->pos >= p->len || p->s[p->pos] != ':') { free(key); fail(p, "expected ':'"); return -1; }
                p->pos++;
            }
            if (grow(p, v, &cap, obj)) { free(key); return -1; }
            if (obj) v->keys[v->count] = key;
            if (parse_value(p, &v->items[v->count], depth + 1)) {
                v->count++; /* free what was built */
                return -1;
            }
            v->count++;
            skip_ws(p);
            if (p->pos >= p->len) { fail(p, "unexpected end"); return -1; }
            if (p->s[p->pos] == ',') { p->pos++; continue; }
            if (p->s[p->pos] == (obj ? '}' : ']')) { p->pos++; return 0; }
            fail(p, obj ? "expected ',' or '}'" : "expected ',' or ']'");
            return -1;
        }
    }
    if (c == '"') {
        v->type = JSON_STRING;
        return (v->string = parse_string(p)) ? 0 : -1;
    }
    if (p->len - p->pos >= 4 && !memcmp(p->s + p->pos, "true", 4)) { v->type = JSON_BOOL; v->number = 1; p->pos += 4; return 0; }
    if (p->len - p->pos >= 5 && !memcmp(p->s + p->pos, "false", 5)) { v->type = JSON_BOOL; p->pos += 5; return 0; }
    if (p->len - p->pos >= 4 && !memcmp(p->s + p->pos, "null", 4)) { v->type = JSON_NULL; p->pos += 4; return 0; }
    if (c == '-' || (c >= '0' && c <= '9')) {
        char buf[64];
        size_t n = 0;
        while (p->pos + n < p->len && n < sizeof buf - 1 &&
               strchr("+-.eE0123456789", p->s[p->pos + n]) && p->s[p->pos + n])
            n++;
        memcpy(buf, p->s + p->pos, n);
        buf[n] = '\0';
        char *endp;
        v->type = JSON_NUMBER;
        v->number = strtod(buf, &endp);
        if (endp == buf || (size_t)(endp - buf) != n) { fail(p, "bad number"); return -1; }
        p->pos += n;
        return 0;
    }
    fail(p, "unexpected character");
    return -1;
}

json_value *json_parse(const char *text, size_t len, char *err, size_t errlen)
{
    parser p = {text, len, 0, err, errlen, 0};
    json_value *v = calloc(1, sizeof *v);
    if (!v) {
        if (err && errlen) snprintf(err, errlen, "JSON: out of memory");
        return NULL;
    }
    if (parse_value(&p, v, 0) == 0) {
        skip_ws(&p);
        if (p.pos == p.len)
            return v;
        fail(&p, "trailing characters");
    }
    json_free(v);
    return NULL;
}

void json_free(json_value *v)
{
    if (!v)
        return;
    free_members(v);
    free(v);
}

const json_value *json_get(const json_value *obj, const char *key)
{
    size_t i;
    if (!obj || obj->type != JSON_OBJECT)
        return NULL;
    for (i = 0; i < obj->count; i++)
        if (!strcmp(obj->keys[i], key))
            return &obj->items[i];
    return NULL;
}
