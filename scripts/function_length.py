# Prints every Swift function, initializer or computed property longer than LIMIT lines (default 80)
# under ROOT, one per line: path:line: N lines: signature. Usage: function_length.py ROOT [LIMIT]
import re,sys,os
limit=int(sys.argv[2]) if len(sys.argv)>2 else 80
root=sys.argv[1]
pat=re.compile(r'^\s*(?:@\w+(?:\([^)]*\))?\s+)*(?:(?:public|private|fileprivate|internal|package|static|final|override|mutating|nonisolated|convenience|required|@inlinable|@usableFromInline)\s+)*(func\s+[^\s(<]+|init[?!]?\s*[(<]|deinit|var\s+\w+\s*:[^=]*\{\s*$)')
for dp,_,fs in os.walk(root):
  for f in fs:
    if not f.endswith('.swift'): continue
    p=os.path.join(dp,f); lines=open(p).read().split('\n')
    i=0
    while i<len(lines):
      m=pat.match(lines[i])
      if m:
        depth=0; started=False; j=i
        while j<len(lines):
          s=re.sub(r'"(?:\\.|[^"\\])*"','""',lines[j]); s=s.split('//')[0]
          for ch in s:
            if ch=='{': depth+=1; started=True
            elif ch=='}': depth-=1
          if started and depth<=0: break
          if not started and j>i+15: break
          j+=1
        n=j-i+1
        if started and n>limit: print(f"{p}:{i+1}: {n} lines: {lines[i].strip()[:70]}")
      i+=1
