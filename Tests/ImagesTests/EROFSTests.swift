import Glibc
import SwiftletSystem
import Testing
import TestSupport
@testable import Images

/// Layers as `tar` makes them, converted to EROFS and checked with erofs-utils' own fsck, which
/// walks every inode and directory and extracts the tree.
@Suite(.enabled(if: access("/usr/bin/fsck.erofs", X_OK) == 0 && access("/usr/bin/tar", X_OK) == 0, "needs erofs-utils and tar"))
struct EROFSTests {
    let dir = TemporaryDirectory()

    func sh(_ line: String) -> Subprocess {
        Subprocess.run(["/bin/sh", "-c", line], environment: ["D": dir.path])
    }

    func info(_ path: String) -> stat {
        var s = stat()
        lstat(path, &s)
        return s
    }

    /// A tree with every kind of entry a layer carries, as root made it.
    func makeLayer() throws -> String {
        let r = sh("""
            set -e; mkdir -p "$D/src/etc/deep/er/still" "$D/src/opaque" "$D/src/empty"
            printf 'hello\\n' > "$D/src/etc/small"
            head -c 3000000 /dev/urandom > "$D/src/etc/big"
            : > "$D/src/etc/empty-file"
            head -c 4096 /dev/urandom > "$D/src/etc/exactly-a-block"
            for i in $(seq 1 400); do : > "$D/src/etc/deep/file-with-a-longish-name-$i"; done
            ln -s ../etc/small "$D/src/etc/link"
            ln "$D/src/etc/small" "$D/src/etc/hard"
            mkfifo "$D/src/etc/fifo"
            chown 1000:2000 "$D/src/etc/big"
            chmod 4755 "$D/src/etc/big"; chmod 0600 "$D/src/etc/small"
            : > "$D/src/.wh.removed"; : > "$D/src/opaque/.wh..wh..opq"
            """)
        try #require(r.status == 0, "\(r.stderr)")
        if TestHost.isRoot { mknod(dir.path + "/src/etc/null", S_IFCHR | 0o666, makedev(1, 3)) }
        let tar = sh(#"cd "$D/src" && tar --numeric-owner --format=pax -cf "$D/layer.tar" ."#)
        try #require(tar.status == 0, "\(tar.stderr)")
        return dir.path + "/layer.tar"
    }

    func makedev(_ major: UInt32, _ minor: UInt32) -> dev_t {
        dev_t((UInt64(major & 0xFFF) << 8) | UInt64(minor & 0xFF) | (UInt64(minor & ~0xFF) << 12) | (UInt64(major & ~0xFFF) << 32))
    }

    @Test func convertedLayersPassFsckAndExtractIdentically() throws {
        let tar = try makeLayer()
        let image = dir.path + "/layer.erofs"
        try LayerConverter.convert(tarPath: tar, to: image)
        let fsck = Subprocess.run(["/usr/bin/fsck.erofs", "--extract=" + dir.path + "/out", "--preserve", image])
        #expect(fsck.status == 0, "\(fsck.stdout)\(fsck.stderr)")
        let diff = sh(#"diff -r --no-dereference -x fifo -x null "$D/src/etc" "$D/out/etc" && echo same"#)
        #expect(diff.stdout.contains("same"), "\(diff.stdout)\(diff.stderr)")
        let src = dir.path + "/src", out = dir.path + "/out"
        for path in ["/etc/big", "/etc/small", "/etc/deep", "/etc/link", "/etc/fifo", "/empty"] {
            let a = info(src + path), b = info(out + path)
            #expect(a.st_mode == b.st_mode || path == "/etc/big", "mode of \(path)") // see the set-uid check below
            #expect(a.st_uid == b.st_uid && a.st_gid == b.st_gid, "owner of \(path)")
        }
        #expect(info(out + "/etc/big").st_uid == 1000 && info(out + "/etc/big").st_gid == 2000)
        // fsck.erofs extracts hard links as copies and chowns after chmod (losing set-uid): look
        // at the inodes themselves.
        let big = try inode(image, "/etc/big"), small = try inode(image, "/etc/small"), hard = try inode(image, "/etc/hard")
        #expect(big.mode == UInt16(S_IFREG) | 0o4755, "set-uid survives")
        #expect(hard.nid == small.nid && hard.links == 2, "hard links share an inode")
        // OCI whiteouts became overlayfs whiteouts: a 0/0 character device.
        let whiteout = info(out + "/removed")
        #expect(whiteout.st_mode & S_IFMT == S_IFCHR && whiteout.st_rdev == 0)
        #expect(access(out + "/opaque/.wh..wh..opq", F_OK) != 0, "the opaque marker is an attribute, not a file")
        if TestHost.isRoot {
            let null = info(out + "/etc/null")
            #expect(null.st_mode & S_IFMT == S_IFCHR && null.st_rdev == makedev(1, 3))
        }
    }

    /// Several layers merged into one image (images with more layers than disks): later entries
    /// win, whiteouts hide lower entries and stay whiteouts, opaque directories drop what lower
    /// layers put in them but keep what their own layer adds.
    @Test func mergedLayersApplyWhiteoutsAndOpaqueDirectories() throws {
        let made = sh(#"""
            set -e; cd "$D"
            mkdir -p l1/a/b l1/d l1/gone-dir; echo x > l1/a/x; echo y > l1/a/b/y; echo keep > l1/d/keep
            echo one > l1/f; ln l1/f l1/g; echo w > l1/w; echo 1 > l1/gone-dir/inside
            (cd l1 && tar --numeric-owner --format=pax -cf ../l1.tar .)
            mkdir -p l2/a/b l2/d; : > l2/.wh.w; : > l2/a/.wh..wh..opq; echo z > l2/a/b/z; echo new > l2/d/new
            echo two > l2/f; : > l2/.wh.gone-dir; : > l2/.wh.below
            (cd l2 && tar --numeric-owner --format=pax -cf ../l2.tar ./a/b/z ./.wh.w ./a/.wh..wh..opq ./d ./f ./.wh.gone-dir ./.wh.below)
            mkdir -p l3/gone-dir; echo back > l3/gone-dir/again
            (cd l3 && tar --numeric-owner --format=pax -cf ../l3.tar .)
            """#)
        try #require(made.status == 0, "\(made.stderr)")
        let image = dir.path + "/merged.erofs"
        let layers = ["l1.tar", "l2.tar", "l3.tar"].map { dir.path + "/" + $0 }
        let fds = layers.map { open($0, O_RDONLY | O_CLOEXEC) }
        defer { fds.forEach { close($0) } }
        try LayerConverter.merge(layers: 3, scratchDirectory: dir.path, to: image, source: { index throws(SwiftletError) in
            let fd = fds[index]
            return { buffer throws(SwiftletError) in try systemCall("read") { read(fd, buffer.baseAddress, buffer.count) } }
        }, afterLayer: { _ throws(SwiftletError) in })
        let fsck = Subprocess.run(["/usr/bin/fsck.erofs", "--extract=" + dir.path + "/out", image])
        #expect(fsck.status == 0, "\(fsck.stdout)\(fsck.stderr)")
        let listing = sh(#"cd "$D/out" && find . | sort | tr '\n' ' '; echo; cat f g d/keep d/new a/b/z gone-dir/again"#).stdout
        #expect(listing == ". ./a ./a/b ./a/b/z ./below ./d ./d/keep ./d/new ./f ./g ./gone-dir ./gone-dir/again ./w \ntwo\none\nkeep\nnew\nz\nback\n",
                "\(listing)")
        // What was hidden stays a whiteout (for disks below); rewritten directories are opaque.
        #expect(info(dir.path + "/out/w").st_mode & S_IFMT == S_IFCHR && info(dir.path + "/out/below").st_mode & S_IFMT == S_IFCHR)
        let g = try inode(image, "/g")
        #expect(g.links == 1, "f was replaced, so g is alone")
        // (dump.erofs shows the size of an inode's attributes: 32 bytes is the one opaque marker.)
        for path in ["/a", "/gone-dir"] {
            let dump = Subprocess.run(["/usr/bin/dump.erofs", "--path=" + path, image]).stdout
            #expect(dump.contains("Xattr size: 32"), "\(path) is opaque: \(dump)")
        }
        #expect(Subprocess.run(["/usr/bin/dump.erofs", "--path=/d", image]).stdout.contains("Xattr size: 0"), "/d was only added to")
    }

    /// An inode's nid (from dump.erofs), link count, and raw i_mode (from the image).
    func inode(_ image: String, _ path: String) throws -> (nid: Int, links: Int, mode: UInt16) {
        let dump = Subprocess.run(["/usr/bin/dump.erofs", "--path=" + path, image]).stdout
        let words = dump.split(whereSeparator: { $0 == " " || $0 == "\n" })
        let nid = try #require(words.firstIndex(of: "NID:").flatMap { Int(words[$0 + 1]) }, "\(dump)")
        let links = try #require(words.firstIndex(of: "Links:").flatMap { Int(words[$0 + 1]) }, "\(dump)")
        let bytes = try OwnedFileDescriptor.openInput(image, role: "image").read(count: 2, at: UInt64(4096 + nid * 32 + 4), what: "image")
        return (nid, links, UInt16(bytes[0]) | UInt16(bytes[1]) << 8)
    }

    @Test func extendedAttributesAreEncodedInTheInode() throws {
        let body = try EROFSBuilder.xattrBody([("trusted.overlay.opaque", Array("y".utf8)), ("user.k", [1, 2, 3])], warn: { _ in })
        // 12-byte header, then entries: name length, prefix index, value size, name, value, padding.
        #expect(Array(body[12..<16]) == [14, 4, 1, 0])
        #expect(Array(body[16..<31]) == Array("overlay.opaquey".utf8))
        #expect(body.count % 4 == 0)
        var warnings: [String] = []
        let dropped = try EROFSBuilder.xattrBody([("weird.name", [1])], warn: { warnings.append($0) })
        #expect(dropped.isEmpty && warnings.count == 1)
    }

    @Test func badLayersAreClearErrorsAndLeaveNoImage() throws {
        let image = dir.path + "/bad.erofs"
        let junk = dir.write("junk.tar", [UInt8](repeating: 0x41, count: 2048))
        #expect { try LayerConverter.convert(tarPath: junk, to: image) } throws: { ($0 as! SwiftletError).message.contains("corrupt") }
        let tar = try makeLayer()
        let bytes = try OwnedFileDescriptor.readSmallFile(tar, limit: 64 << 20)
        let truncated = dir.write("truncated.tar", Array(bytes.prefix(bytes.count / 2)))
        #expect { try LayerConverter.convert(tarPath: truncated, to: image) } throws: { ($0 as! SwiftletError).message.contains("truncated") }
        let escaping = sh(#"mkdir -p "$D/e" && cd "$D/e" && : > x && tar --transform 's,^x,../../etc/evil,' -cPf "$D/escape.tar" x"#)
        try #require(escaping.status == 0, "\(escaping.stderr)")
        #expect { try LayerConverter.convert(tarPath: dir.path + "/escape.tar", to: image) } throws: { ($0 as! SwiftletError).message.contains("escapes the root") }
        #expect(access(image, F_OK) != 0, "no image")
        #expect(!sh(#"ls -a "$D""#).stdout.contains(".partial"), "not even a partial one")
    }
}
